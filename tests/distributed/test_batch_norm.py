"""BatchNorm under data parallelism: the statistics are the whole batch's (synchronised over the
ranks, differentiable in both modes), so a model with BatchNorm follows the single-process run
too, and FG-A's batch coupling 'total' sums the loss derivatives over every rank's shard."""
import dataclasses

import numpy as np
import pytest

from dualnet import distributed, models
from dualnet import primitives as P
from dualnet.nn.layers import RankStatistics, batch_norm
from dualnet.train import Config, train

from .test_data_parallel import base, needs_mpi, params_of, run_mpi

pytest.importorskip("sklearn")
BN_MLP = dict(model="mlp", model_options={"hidden": 12, "layers": 3, "batch_norm": True})
RULES = {"bp": {}, "fa": {}, "dfa": {}, "fdfa": {}, "fg-w": {}, "fg-a": {}, "lg-fg-a": {}, "guess": {},
         "fg-a-own": {"batch_coupling": "own"}}


@needs_mpi
def test_batch_norm_models_follow_the_single_process_run(tmp_path):
    runs, single = {}, {}
    for label, options in RULES.items():
        config = Config(rule=label.removesuffix("-own"), rule_options=options, **BN_MLP,
                        **base(str(tmp_path / f"1-{label}")))
        train(config)
        single[label] = params_of(config.out)
        runs[label] = dataclasses.replace(config, out=str(tmp_path / f"2-{label}"))
    run_mpi(2, runs, tmp_path)
    for label, config in runs.items():
        for name, expected in single[label].items():
            np.testing.assert_allclose(params_of(config.out)[name], expected, rtol=2e-4, atol=2e-6,
                                       err_msg=f"{label}: {name}")


class TwoRanksInOneProcess:
    """A stand-in world for ``rank_sum``: the other rank's contribution is a fixed array."""
    size = 2

    def __init__(self, other):
        self.other = other

    def allreduce(self, array):
        return array + self.other


def test_synchronised_statistics_are_the_whole_batch_s(rng):
    """Shard 0's output under synchronised statistics equals rows 0:3 of the whole batch's."""
    x = rng.standard_normal((5, 4))
    gamma, beta, running = np.ones(4), np.zeros(4), (np.zeros(4), np.ones(4))
    whole, _ = batch_norm(x, gamma, beta, running, True)
    # the other rank (rows 3:5) adds its row sums, then its squared deviations from the whole mean
    mean = x.mean(axis=0, keepdims=True)
    others = [x[3:].sum(axis=0, keepdims=True), ((x[3:] - mean) ** 2).sum(axis=0, keepdims=True)]
    calls = iter(others)
    rank_sum = P.Primitive("rank_sum", lambda a: a + next(calls))
    shard, _ = batch_norm(x[:3], gamma, beta, running, True, over_ranks=RankStatistics(rank_sum, 3, 5))
    np.testing.assert_allclose(shard, whole[:3], rtol=1e-12)


def test_a_sharded_model_normalises_over_the_ranks_and_the_model_stays_as_it_was(rng):
    """The whole batch is the shard twice (the other rank holds the same rows), so summing over
    the ranks doubles this rank's sums.  The sharded copy's pass then matches the whole batch's:
    its BatchNorms' running variances use the batch's count (6 rows, not the shard's 3) for the
    unbiased variance.  The model itself keeps normalising over its own rows."""
    model = models.create("mlp", hidden=6, layers=3, batch_norm=True, input_shape=(1, 2, 2))
    params, x, labels = model.init(0, "float64"), rng.standard_normal((3, 1, 2, 2)), np.array([0, 1, 2])
    calls = []
    rank_sum = P.Primitive("rank_sum", lambda a: calls.append(1) or 2 * a, jvp=(lambda t, out, a: 2 * t,))
    sharded = model.sharded(RankStatistics(rank_sum, 3, 6))
    shard = sharded.forward(params, x, labels)
    whole = model.forward(params, np.concatenate([x, x]), np.concatenate([labels, labels]))
    alone = model.forward(params, x, labels)
    assert calls and model.over_ranks is None
    np.testing.assert_allclose(shard.logits, whole.logits[:3], rtol=1e-12)
    for key, (mean, var) in whole.state.items():
        np.testing.assert_allclose(shard.state[key][0], mean, rtol=1e-12)
        np.testing.assert_allclose(shard.state[key][1], var, rtol=1e-12)
        assert not np.allclose(alone.state[key][1], var, rtol=1e-6)


def test_rank_sum_passes_the_weighted_cotangents_back():
    """vjp: x̄_r = Σ_r' w_r' ḡ_r' / w_r (the ranks' gradients are scaled by w_r afterwards)."""
    from dualnet import autodiff
    world = TwoRanksInOneProcess(other=np.array([0.25 * 3.0]))  # rank 1 (w = 0.25) sends back ḡ = 3
    rank_sum = distributed.data_parallel.rank_sum(world, 0.75)
    _, pullback = autodiff.vjp(lambda v: P.sum(rank_sum(v) * 2.0), np.array([1.0]))
    (cotangent,) = pullback(np.ones(()))
    np.testing.assert_allclose(cotangent, (0.75 * 2.0 + 0.25 * 3.0) / 0.75)
