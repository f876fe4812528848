"""BatchNorm under data parallelism: each rank normalises with its shard's statistics (as PyTorch's
DistributedDataParallel does).  A P-rank step is then the single-process step on "ghost
batches": the weighted mean of the rule's estimates on the shards, each with its own statistics;
and FG-A's batch coupling 'total' stays unbiased for that objective."""
import dataclasses

import numpy as np
import pytest

from dualnet import data, distributed, rules
from dualnet.rules import Batch, exact_gradients
from dualnet.train import Config, _step_rng, build_model, prepare_data

from .test_data_parallel import base, needs_mpi, params_of, run_mpi

pytest.importorskip("sklearn")
BN_MLP = dict(model="mlp", model_options={"hidden": 12, "layers": 3, "batch_norm": True})


def ghost_batch_step(config, size):
    """Parameters after the first SGD step (no momentum yet) from the shards' weighted estimates."""
    dataset, train_x, train_y, _, _ = prepare_data(config)
    model = build_model(config, dataset)
    params, state = model.init(config.seed), model.init_state()
    rule = rules.create(config.rule, **config.rule_options)
    rule.setup(model, params, config.seed)
    xb, yb = next(data.batches(train_x, train_y, config.batch_size, config.seed, epoch=0))
    total, grads = len(yb), {}
    for rank in range(size):
        rows = distributed.shard(total, rank, size)
        estimate = rule(model, params, xb[rows], yb[rows], _step_rng(config.seed, 0, 0), state,
                        Batch(rows.start, rows.stop, total))
        for name, g in estimate.grads.items():
            grads[name] = grads.get(name, 0) + (rows.stop - rows.start) / total * g.astype(np.float64)
    return {name: p - config.lr * grads[name] for name, p in params.items()}


@needs_mpi
def test_p_ranks_step_as_ghost_batches_of_their_shards(tmp_path):
    runs = {rule: Config(rule=rule, **BN_MLP, **{**base(str(tmp_path / rule)), "optimizer_options": {}})
            for rule in ("bp", "fg-a", "fg-w")}
    run_mpi(2, runs, tmp_path, max_steps=1)
    for rule, config in runs.items():
        expected = ghost_batch_step(config, 2)
        for name, value in params_of(config.out).items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7, err_msg=f"{rule}: {name}")


def test_fg_a_total_coupling_is_unbiased_on_a_shard(tiny):
    """A shard's FG-A estimate (noise drawn by global row) averages to the exact gradient of the
    shard's own objective, BatchNorm statistics of the shard included."""
    model = tiny.mlp(batch_norm=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 9)
    rows, state = slice(3, 7), model.init_state(np.float64)
    exact, _ = exact_gradients(model, params, x[rows], labels[rows], "global", state)
    rule = rules.create("fg-a", directions=2000)
    calls = 50
    samples = {}
    for call in range(calls):
        estimate = rule(model, params, x[rows], labels[rows], np.random.default_rng(100 + call), state,
                        Batch(rows.start, rows.stop, len(labels)))
        for name, g in estimate.grads.items():
            samples.setdefault(name, []).append(g)
    floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
    for name, s in samples.items():  # t statistic per coordinate; 49 d.o.f.: P(|t| > 5.5) = 1.4e-6
        s = np.stack(s)
        se = s.std(axis=0, ddof=1) / np.sqrt(calls)
        assert float(np.max(np.abs(s.mean(axis=0) - exact[name]) / (se + floor))) < 5.5, name


def test_own_coupling_differs_from_total_on_a_shard(tiny):
    """The test above can fail: 'own' (biased under BatchNorm) is told apart from the exact gradient."""
    model = tiny.mlp(batch_norm=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 9)
    rows, state = slice(3, 7), model.init_state(np.float64)
    exact, _ = exact_gradients(model, params, x[rows], labels[rows], "global", state)
    rule = rules.create("fg-a", directions=20000, batch_coupling="own")
    estimate = rule(model, params, x[rows], labels[rows], np.random.default_rng(1), state,
                    Batch(rows.start, rows.stop, len(labels)))
    name = "blocks.0.linear.weight"
    error = np.linalg.norm(estimate.grads[name] - exact[name]) / np.linalg.norm(exact[name])
    assert error > 0.1, dataclasses.asdict(Batch(3, 7, 9)) | {"error": error}
