"""The block pipeline (dualnet/distributed/pipeline.py) gives the single-process run bit for bit.

In process (no MPI): a rule run stage by stage on ``StageModel`` views, each stage fed the
previous stage's output, gives every parameter the same float64 estimate as the rule on the whole
model.  Under ``mpiexec -n S`` (tests/distributed/pipeline_worker.py): S = 2 and 3 stages train
every supported rule on an MLP (BatchNorm, local heads) and a LocalMixer and write the
checkpoint of the single-process run, bit for bit when both use one BLAS thread and the BLAS rounds
a GEMM row independently of the row count (else to the data-parallel tolerance); a pipelined run
resumes on another S and on one process; divergence stops every stage; misuse is one line.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dualnet import models, rules
from dualnet.distributed import pipeline
from dualnet.run import _flatten
from dualnet.train import Config, load_checkpoint

MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or __import__("importlib").util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "distributed", "pipeline_worker.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}

MODELS = {  # three blocks each, so that S = 3 puts one block on each stage
    "mlp": dict(model="mlp", model_options={"hidden": 12, "layers": 4, "batch_norm": True}),
    "localmixer": dict(model="localmixer", model_options={"config": "S/1/1", "channels": 8, "blocks": 3,
                                                          "groups": 2, "patches": 2}),
}
RULES = {"lg-fg-a": ("lg-fg-a", {}), "lg-fg-w": ("lg-fg-w", {}), "lg-bp": ("lg-bp", {}), "lg-fa": ("lg-fa", {}),
         "guess": ("guess", {"target": "local"}),  # the guess: a local guess (the head's gradient)
         "dfa": ("dfa", {}), "dkp": ("dkp", {"feedback_lr": 0.01}),  # the last stage broadcasts e
         "fg-a": ("fg-a", {"directions": 2}),  # tangents travel forward, the last stage broadcasts d
         "fdfa": ("fdfa", {"directions": 2})}  # ... and e with the logits' tangent
GUESSES = [{"target": "local", "guess": "gaussian"}, {"target": "local", "guess": "ntk", "space": "weight"},
           {"target": "local", "guess": "rademacher", "projection": "span"}, {"target": "local", "guess": "fixed-ntk"},
           {"target": "local", "coupled_activity": "example"},
           {"target": "local", "space": "weight", "weight_examples": "example", "weight_unit": "module"},
           {"target": "local", "guess": "gaussian", "space": "weight", "weight_examples": "example"}]


def base(out, **changes):
    # 100 examples in batches of 40: a short last batch; momentum: optimiser state on every stage
    return dict(dict(dataset="digits", epochs=2, batch_size=40, lr=0.05, seed=3, train_limit=100, eval_limit=50,
                     optimizer_options={"momentum": 0.9}, out=out), **changes)


def launch(runs, tmp_path, processes=None, resume=False, max_steps=None, name="spec"):
    """Train ``runs`` ({key: Config}) in one process (``processes=None``) or under mpiexec -n S."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"runs": {k: dataclasses.asdict(c) for k, c in runs.items()}, "resume": resume,
                                "max_steps": max_steps}))
    command = [sys.executable, WORKER, str(spec)]
    if processes is not None:
        command = [MPIEXEC, "-n", str(processes)] + command
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def checkpoint_of(out):
    parts, position, history = load_checkpoint(os.path.join(out, "checkpoint.npz"))
    for line in history:
        line.pop("wall_s")
    position.pop("wall_s")
    return {part: _flatten(parts[part]) for part in ("params", "state", "optimizer", "rule")}, position, history


def gemm_rows_ignore_the_row_count():
    """Whether this BLAS gives a GEMM's row the same bits whatever the number of rows around it.
    OpenBLAS's SkylakeX kernels do; its Haswell kernels (OPENBLAS_CORETYPE=Haswell) give the rows
    of a short tail other last bits, so a stage that stacks fewer directions or rows than the
    single process does (the guess rule's passes) rounds differently."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for rows, inner, columns in [(40, 12, 12), (20, 64, 12), (6, 8, 4)]:
            x, w = (rng.standard_normal(shape).astype(dtype) for shape in [(rows, inner), (inner, columns)])
            more = rng.standard_normal((2 * rows, inner)).astype(dtype)
            if not np.array_equal((np.concatenate([x, more]) @ w)[:rows], x @ w):
                return False
    return True


def assert_same_run(got_out, expected_out, what):
    """Bit for bit where the BLAS rounds a row independently of the row count; else to the
    data-parallel tests' tolerance (the same arithmetic, rounded differently)."""
    exact = gemm_rows_ignore_the_row_count()
    got, expected = checkpoint_of(got_out), checkpoint_of(expected_out)
    for part in expected[0]:
        assert sorted(got[0][part]) == sorted(expected[0][part]), f"{what}: {part} entries differ"
        for name, value in expected[0][part].items():
            if exact or not np.issubdtype(np.asarray(value).dtype, np.floating):
                np.testing.assert_array_equal(got[0][part][name], value, err_msg=f"{what}: {part} {name}")
            else:
                np.testing.assert_allclose(got[0][part][name], value, rtol=2e-4, atol=2e-6,
                                           err_msg=f"{what}: {part} {name} (BLAS rows depend on the row count)")
    assert (got[1:] == expected[1:]) if exact else _close(got[1:], expected[1:]), f"{what}: position or metrics differ"


def _close(a, b):
    """Equal structure, equal integers and strings, floats to the data-parallel tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return bool(np.isclose(a, b, rtol=2e-4, atol=2e-6))
    return a == b


# ---------------------------------------------------------------------------------------
# in process: a rule on stage views equals the rule on the whole model (float64)
# ---------------------------------------------------------------------------------------
def _model(name):
    options = dict(MODELS[name]["model_options"], input_shape=(1, 8, 8), num_classes=4)
    if name == "mlp":
        options["local_heads"] = True  # optional on the MLP, always there on the LocalMixer
    return models.create(name, **options)


def _staged_estimate(rule_name, options, model, params, state, x, y, counts, seed):
    """The rule's estimate for every parameter, computed stage by stage (stage s's input: stage
    s−1's output), with one rule object per stage as on separate processes; for DFA and DKP every
    stage's update waits for the last stage's output error e."""
    estimates, signal, h, start = [], rules.create(rule_name, **options).pipeline == "signal", x, 0
    from dualnet.dual import Dual
    for count in counts:
        view = pipeline.StageModel(model, range(start, start + count))
        rule = rules.create(rule_name, **options)
        rule.setup(model, params, seed)
        mine = {name: params[name] for name in view.names()}
        arguments = (view, mine, h, y, np.random.default_rng([seed, 0, 0]),
                     {key: state[key] for key in view.state_keys()})
        estimates.append((rule, view, mine, rule.forward_pass(*arguments, rules.Batch.whole(len(y))) if signal
                          else rule(*arguments)))
        h, start = view.output, start + count
        if rule.pipeline_tangents:  # FG-A, FDFA: the tangent of the output travels with it
            h = Dual._make(view.output, view.output_tangent)
    if signal:
        last_rule, _, _, last_forward = estimates[-1]
        error = last_rule.signal(last_forward, y)
        estimates = [(rule, view, mine, rule.updates(view, mine, forward, error, rules.Batch.whole(len(y))))
                     for rule, view, mine, forward in estimates]
    grads, new_state = {}, {}
    for _, view, mine, estimate in estimates:
        assert set(estimate.grads) <= set(mine), f"stage {view.blocks()}: gradients for other stages' parameters"
        grads.update(estimate.grads)
        new_state.update(estimate.state)
    return grads, new_state, estimates[-1][3].loss


CASES = list(RULES.values()) + [("guess", options) for options in GUESSES] + [
    ("fg-a", {"memory": "recompute"}), ("fg-a", {"site": "post", "batch_coupling": "own", "norm_grad": False})]


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule_name, options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_stages_give_the_whole_models_estimate_in_float64(model_name, rule_name, options):
    model = _model(model_name)
    params = model.init(1, dtype=np.float64)
    state = model.init_state(np.float64)
    data = np.random.default_rng(2)
    x, y = data.standard_normal((6, 1, 8, 8)), data.integers(0, 4, 6)
    rule = rules.create(rule_name, **options)
    rule.setup(model, params, 7)
    whole = rule(model, params, x, y, np.random.default_rng([7, 0, 0]), state)
    for counts in ([2, 1], [1, 2], [1, 1, 1]):
        grads, new_state, loss = _staged_estimate(rule_name, options, model, params, state, x, y, counts, 7)
        assert sorted(grads) == sorted(whole.grads) and loss == whole.loss
        for name, g in whole.grads.items():  # bit for bit: every stage runs its blocks' arithmetic unchanged
            if rule_name == "guess":  # a stage's pass carries only its blocks' guesses: GEMMs with fewer
                # direction rows, which a multi-threaded BLAS may split differently (equal bit for bit on
                # the 2-core test machine)
                np.testing.assert_allclose(grads[name], g, rtol=1e-10, atol=1e-14 * np.abs(g).max(),
                                           err_msg=f"{rule_name}, stages {counts}: {name}")
                continue
            np.testing.assert_array_equal(grads[name], g, err_msg=f"{rule_name}, stages {counts}: {name}")
        for key, arrays in whole.state.items():
            for got, expected in zip(new_state[key], arrays):
                np.testing.assert_array_equal(got, expected, err_msg=f"{rule_name}, stages {counts}: {key}")


def test_fg_a_store_and_recompute_draw_the_same_noise():
    """The noise of a site is keyed by (step seed, block, layer): the two memory modes agree."""
    model = _model("localmixer")
    params = model.init(1, dtype=np.float64)
    x, y = np.random.default_rng(2).standard_normal((6, 1, 8, 8)), np.arange(6) % 4
    store = rules.create("lg-fg-a")(model, params, x, y, np.random.default_rng(5))
    recompute = rules.create("lg-fg-a", memory="recompute")(model, params, x, y, np.random.default_rng(5))
    for name, g in store.grads.items():
        np.testing.assert_allclose(recompute.grads[name], g, rtol=1e-12, atol=1e-14, err_msg=name)


def test_balanced_partition_and_its_override():
    assert pipeline.partition([1, 1, 1, 1], 2) == [2, 2]
    assert pipeline.partition([10, 1, 1, 1], 2) == [1, 3]
    assert pipeline.partition([1, 1, 1, 10], 3)[-1] == 1  # the expensive block alone
    assert pipeline.partition([5, 5, 5], 3) == [1, 1, 1]
    mlp = models.create("mlp", input_shape=(1, 28, 28), hidden=100, layers=4, local_heads=True)
    assert pipeline.partition(pipeline.block_costs(mlp), 2) == [1, 2]  # the 784-wide first layer dominates
    with pytest.raises(ValueError, match="4 stages for 3 blocks"):
        pipeline.partition([1, 1, 1], 4)
    assert pipeline.check_stages([2, 1], 3, 2) == [2, 1]
    for wrong in ([3], [2, 2], [3, 0]):
        with pytest.raises(ValueError, match="one positive block count per process"):
            pipeline.check_stages(wrong, 3, 2)


# ---------------------------------------------------------------------------------------
# under mpiexec
# ---------------------------------------------------------------------------------------
@needs_mpi
def test_s_stages_write_the_single_process_checkpoint_bit_for_bit(tmp_path):
    runs = {size: {} for size in (None, 2, 3)}
    for model in MODELS:
        for key, (rule, options) in RULES.items():
            key = f"{model}-{key}"
            runs[None][key] = Config(rule=rule, rule_options=options, **MODELS[model],
                                     **base(str(tmp_path / f"1-{key}")))
            for size in (2, 3):
                runs[size][key] = dataclasses.replace(runs[None][key], out=str(tmp_path / f"{size}-{key}"),
                                                      parallel="pipeline")
    for size, batch in runs.items():
        launch(batch, tmp_path, size, name=f"spec-{size}")
    for key, single in runs[None].items():
        for size in (2, 3):
            assert_same_run(runs[size][key].out, single.out, f"{key}, S={size}")
        summary = json.load(open(os.path.join(runs[3][key].out, "summary.json")))
        assert summary["stages"] == [1, 1, 1] and summary["bytes_per_batch"] > 0


@needs_mpi
def test_stages_override_and_resume_on_another_s_and_on_one_process(tmp_path):
    single = Config(rule="lg-fg-a", **MODELS["localmixer"], **base(str(tmp_path / "single")))
    launch({"single": single}, tmp_path, name="single")
    cut = dataclasses.replace(single, out=str(tmp_path / "cut"), parallel="pipeline", stages=[2, 1])
    launch({"cut": cut}, tmp_path, 2, max_steps=4, name="cut")  # one epoch and a step, on 2 stages
    assert json.load(open(os.path.join(cut.out, "summary.json")))["stages"] == [2, 1]
    assert sorted(os.listdir(cut.out)) == ["checkpoint.npz", "config.json", "metrics.jsonl", "params.npz",
                                           "summary.json"]
    resumed = dataclasses.replace(cut, stages=None)
    two = tmp_path / "two"
    shutil.copytree(cut.out, two)
    launch({"resumed": resumed}, tmp_path, 3, resume=True, name="resume-3")  # the rest on 3 stages
    assert_same_run(cut.out, single.out, "2 stages, then 3")
    launch({"resumed": dataclasses.replace(resumed, out=str(two), parallel=None)}, tmp_path, resume=True,
           name="resume-1")  # or on one process
    assert_same_run(str(two), single.out, "2 stages, then one process")
    changes = json.load(open(os.path.join(cut.out, "config.json")))["changes"]
    assert {"field": "stages", "from": [2, 1], "to": None, "at": {"epoch": 1, "step": 1}} in changes


@needs_mpi
def test_a_non_finite_step_stops_every_stage_without_a_checkpoint(tmp_path):
    config = Config(rule="lg-bp", parallel="pipeline", **MODELS["mlp"],
                    **base(str(tmp_path / "diverged"), lr=1e30, epochs=3))
    done = launch({"diverged": config}, tmp_path, 3, name="diverged")
    assert "diverged: a loss or a gradient became non-finite" in done.stdout
    assert not os.path.exists(os.path.join(config.out, "checkpoint.npz"))


@needs_mpi
@pytest.mark.parametrize("argv, message", [
    (["--rule", "fg-w"], "'fg-w' needs a signal from later blocks that the pipeline does not carry"),
    (["--rule", "guess"], "guess with target='local' only"),
    (["--rule", "lg-fg-a", "--stages", "1,1"], "--stages 1,1: give one positive block count per process"),
    (["--rule", "lg-fg-a", "--layers", "2"], "2 stages for 1 blocks"),
])
def test_what_the_pipeline_cannot_run_is_one_line_and_writes_nothing(tmp_path, argv, message):
    out = tmp_path / "run"
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "dualnet", "train", "--model", "mlp", "--dataset", "digits",
               "--parallel", "pipeline", "--out", str(out)] + argv
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD, "PYTHONPATH": ROOT})
    assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
    assert not out.exists()


@needs_mpi
def test_ctrl_c_stops_every_stage_at_one_step_and_the_run_resumes_on_one_process(tmp_path):
    """SIGINT to mpiexec (which forwards it to every rank): the stages agree on one step, rank 0
    writes one checkpoint there, and the rest of the run on one process gives the uninterrupted run."""
    import signal
    import time
    single = Config(rule="lg-fg-w", **MODELS["mlp"], **base(str(tmp_path / "single"), epochs=40, train_limit=400))
    launch({"single": single}, tmp_path, name="single")
    cut = dataclasses.replace(single, out=str(tmp_path / "cut"), parallel="pipeline")
    spec = tmp_path / "cut.json"
    spec.write_text(json.dumps({"runs": {"cut": dataclasses.asdict(cut)}}))
    command = [MPIEXEC, "-n", "3", sys.executable, WORKER, str(spec)]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": ROOT}
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = os.path.join(cut.out, "checkpoint.npz")
    deadline = time.time() + 120
    while not os.path.exists(checkpoint) and time.time() < deadline and running.poll() is None:
        time.sleep(0.05)
    running.send_signal(signal.SIGINT)
    out, err = running.communicate(timeout=120)
    assert running.returncode != 0 and "interrupted at epoch" in out + err, out[-2000:] + err[-2000:]
    stopped = checkpoint_of(cut.out)[1]
    assert 0 < stopped["epoch"] < single.epochs, stopped
    launch({"rest": dataclasses.replace(cut, parallel=None)}, tmp_path, resume=True, name="rest")
    assert_same_run(cut.out, single.out, "interrupted on 3 stages, finished on one process")


def test_each_rule_declares_how_the_pipeline_trains_it():
    """``Rule.pipeline``: 'local' for the local greedy rules (and guess with its local target), 'signal'
    for those that need only the last stage's per-example signal, None for the rest; only FG-A's and
    FDFA's forward messages carry tangents."""
    kinds = {name: rules.create(name).pipeline for name in rules.names()}
    assert {name for name, kind in kinds.items() if kind == "local"} == {"lg-fg-a", "lg-fg-w", "lg-bp", "lg-fa"}
    assert {name for name, kind in kinds.items() if kind == "signal"} == {"dfa", "dkp", "fdfa", "fg-a"}
    assert {name for name in rules.names() if rules.create(name).pipeline_tangents} == {"fg-a", "fdfa"}
    assert rules.create("guess", target="local").pipeline == "local"
    assert rules.create("guess", target="local", aux="linear").pipeline is None
    refusals = {("guess", ()): "target='local' only", ("guess", (("target", "local"), ("aux", "linear"))): "aux=None",
                ("dkp", (("adam", True),)): "dkp with adam=True", ("fdfa", (("adam", True),)): "fdfa with adam=True",
                ("lg-fg-a", (("contrastive", True),)): "contrastive=True", ("lg-fg-a", ()): None}
    for (name, options), fragment in refusals.items():
        refusal = rules.create(name, **dict(options)).pipeline_refusal()
        assert (refusal is None) if fragment is None else (fragment in refusal), (name, options, refusal)
