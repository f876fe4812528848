"""Data parallelism over MPI: P ranks give the single-process trajectory (P-invariance), ranks
stay identical, rank 0 alone writes, and a run resumes with another P.

Each P runs once under ``mpiexec -n P`` (tests/distributed/worker.py), training every rule a few
steps; the single-process runs happen here.  Shards of a batch are summed in another order than
one process sums the batch, so parameters agree to float rounding (float64: 1e-9 relative),
not bit for bit.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dualnet import distributed
from dualnet.train import Config, load_checkpoint, train

pytest.importorskip("sklearn")
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or __import__("importlib").util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "mlp": dict(model="mlp", model_options={"hidden": 12, "layers": 3, "batch_norm": False}),
    "localmixer": dict(model="localmixer", model_options={"config": "S/1/1", "channels": 8, "blocks": 2,
                                                          "groups": 2, "patches": 2}),
}
RULES = {name: (name, {}) for name in ["bp", "lg-bp", "fa", "lg-fa", "dfa", "dkp", "fdfa", "fg-w", "lg-fg-w", "fg-a",
                                      "lg-fg-a", "guess"]}
RULES.update({"guess-gaussian": ("guess", {"guess": "gaussian"}), "guess-weight": ("guess", {"space": "weight"}),
              "guess-weight-aux": ("guess", {"space": "weight", "aux": "linear"}),
              "guess-weight-examples": ("guess", {"space": "weight", "weight_examples": "example"}),
              "guess-gaussian-weight-examples": ("guess", {"guess": "gaussian", "space": "weight",
                                                           "weight_examples": "example"}),
              "fg-a-recompute": ("fg-a", {"memory": "recompute", "directions": 2})})


def base(out):
    return dict(dataset="digits", epochs=1, batch_size=50, lr=0.05, seed=5, train_limit=150, eval_limit=50,
                optimizer_options={"momentum": 0.9}, out=out)


def run_mpi(size, runs, tmp_path, max_steps=None, env=None):
    spec = tmp_path / f"spec-{size}.json"
    spec.write_text(json.dumps({"runs": {k: dataclasses.asdict(c) for k, c in runs.items()}, "max_steps": max_steps}))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([MPIEXEC, "-n", str(size), sys.executable, os.path.join(ROOT, "tests", "distributed",
                                                                                   "worker.py"), str(spec)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def params_of(out):
    return load_checkpoint(os.path.join(out, "checkpoint.npz"))[0]["params"]


@needs_mpi
@pytest.mark.parametrize("model", sorted(MODELS))
def test_p_ranks_follow_the_single_process_trajectory(tmp_path, model):
    single, parallel = {}, {2: {}, 3: {}}
    for rule, (name, options) in RULES.items():
        config = Config(rule=name, rule_options=options, **MODELS[model], **base(str(tmp_path / f"1-{rule}")))
        train(config)
        single[rule] = params_of(config.out)
        for size in parallel:
            parallel[size][rule] = dataclasses.replace(config, out=str(tmp_path / f"{size}-{rule}"))
    for size, runs in parallel.items():
        run_mpi(size, runs, tmp_path)
        for rule, config in runs.items():
            got = params_of(config.out)
            for name, expected in single[rule].items():
                np.testing.assert_allclose(got[name], expected, rtol=2e-4, atol=2e-6,
                                           err_msg=f"{rule} on {model}, P={size}: {name}")


def test_shards_cover_the_batch_in_order():
    for n in (1, 7, 50, 64):
        for size in (1, 2, 3, 5):
            rows = [distributed.shard(n, rank, size) for rank in range(size)]
            assert [r.start for r in rows] == [0] + [r.stop for r in rows[:-1]] and rows[-1].stop == n
            lengths = [r.stop - r.start for r in rows]
            assert max(lengths) - min(lengths) <= 1


def test_without_mpi4py_parallel_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    from dualnet import cli
    real_import = builtins.__import__

    def no_mpi(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_mpi)
    code = cli.main(["train", "--parallel", "data", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'dualnet[mpi]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_plain_run_never_imports_mpi(tmp_path):
    code = ("import sys, dualnet.cli as c; c.main(['train','--dataset','digits','--train-limit','64','--out',"
            f"{str(tmp_path / 'run')!r}]); print('mpi4py' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@needs_mpi
def test_rank_zero_writes_and_a_run_resumes_with_another_p(tmp_path):
    config = Config(rule="fg-w", **MODELS["mlp"], **{**base(str(tmp_path / "single")), "epochs": 2})
    train(config)
    cut = dataclasses.replace(config, out=str(tmp_path / "cut"))
    run_mpi(2, {"cut": cut}, tmp_path, max_steps=4)  # one epoch and a step, on two ranks
    assert sorted(os.listdir(cut.out)) == ["checkpoint.npz", "config.json", "metrics.jsonl", "params.npz",
                                           "summary.json"]
    assert json.load(open(os.path.join(cut.out, "config.json")))["parallel"] == "data"
    train(dataclasses.replace(cut, parallel=None), resume=True)  # and finishes on one
    for name, expected in params_of(config.out).items():
        np.testing.assert_allclose(params_of(cut.out)[name], expected, rtol=2e-4, atol=2e-6, err_msg=name)
    changes = json.load(open(os.path.join(cut.out, "config.json")))["changes"]
    assert {"field": "parallel", "from": "data", "to": None, "at": {"epoch": 1, "step": 1}} in changes


def test_a_span_projection_refuses_a_shard(tiny):
    """Projecting on the span of the whole batch's guesses needs every example: one clear error."""
    from dualnet import rules
    from dualnet.rules import Batch
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create("guess", guess="gaussian", projection="span")
    rule.setup(model, params, 0)
    with pytest.raises(ValueError, match="cannot run data-parallel"):
        rule(model, params, x[:2], labels[:2], np.random.default_rng(0), None, Batch(0, 2, 4))
    rule(model, params, x, labels, np.random.default_rng(0), None, Batch(0, 4, 4))  # the whole batch is fine
