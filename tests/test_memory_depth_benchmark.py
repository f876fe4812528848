"""benchmarks/memory_depth.py's BP with activation checkpointing: the exact gradient of plain BP
(float64, every segmentation, depths 2 to 9), and less memory than plain BP on a deep net."""
import importlib.util
import itertools
import pathlib
import tracemalloc

import numpy as np
import pytest

from dualnet import models, rules

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def memory_depth():
    """benchmarks/memory_depth.py loaded from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("memory_depth", BENCHMARKS / "memory_depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlp(depth, hidden, seed=0):
    model = models.create("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=hidden, layers=depth, batch_norm=False)
    return model, {name: value.astype(np.float64) for name, value in model.init(seed).items()}


def test_segments_cover_the_blocks_in_order(memory_depth):
    assert memory_depth.segment_bounds(1) == [(0, 1)]
    assert memory_depth.segment_bounds(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]  # √16 = 4 runs of 4
    for blocks in range(1, 40):
        for segments in (None, 1, 2, 5, 100):
            bounds = memory_depth.segment_bounds(blocks, segments)
            assert bounds[0][0] == 0 and bounds[-1][1] == blocks
            assert all(a < b for a, b in bounds)
            assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))


@pytest.mark.parametrize("depth", [2, 3, 5, 9])
def test_checkpointed_bp_gradient_equals_plain_bp(memory_depth, depth):
    model, params = _mlp(depth, hidden=7)
    rng = np.random.default_rng(depth)
    x, labels = rng.standard_normal((6, 1, 4, 4)), rng.integers(0, 3, 6)
    plain = rules.create("bp")(model, params, x, labels, rng)
    blocks = model.num_blocks
    for segments in (None, 1, 2, blocks):
        grads, loss = memory_depth.checkpointed_bp(model, params, x, labels, segments)
        assert sorted(grads) == sorted(plain.grads)
        assert loss == pytest.approx(plain.loss, rel=1e-14)
        for name, gradient in grads.items():
            assert gradient.dtype == np.float64
            np.testing.assert_allclose(gradient, plain.grads[name], rtol=1e-12, atol=1e-15, err_msg=name)
            assert np.abs(gradient).max() > 0, name  # the comparison is not between zeros
    as_rule = memory_depth.CheckpointedBackprop()(model, params, x, labels, rng)  # the benchmark's entry
    for name, gradient in as_rule.grads.items():
        np.testing.assert_allclose(gradient, plain.grads[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_checkpointed_bp_refuses_models_with_running_statistics(memory_depth):
    model = models.create("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=5, layers=3, batch_norm=True)
    with pytest.raises(ValueError, match="running statistics"):
        memory_depth.checkpointed_bp(model, model.init(0), np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, int))


def _peak(step):
    tracemalloc.start()
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_checkpointing_stores_less_than_plain_bp_on_a_deep_net(memory_depth):
    """17 layers (16 hidden, 4 segments of 4), batch 512, width 64: the tape keeps 4 segment inputs
    instead of every layer's values, and the backward pass holds one segment's recomputation at a
    time.  Peaks are counted beyond the returned gradients (the same for both)."""
    model = models.create("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=64, layers=17, batch_norm=False)
    params = model.init(0)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((512, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 512)
    bp = rules.create("bp")
    gradient_bytes = sum(p.nbytes for p in params.values())
    plain = _peak(lambda: bp(model, params, x, labels, rng)) - gradient_bytes
    checkpointed = _peak(lambda: memory_depth.checkpointed_bp(model, params, x, labels)) - gradient_bytes
    assert checkpointed < 0.6 * plain, (checkpointed, plain)
