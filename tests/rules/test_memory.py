"""FG-A's ``memory='recompute'``: a forward-mode pass that keeps no layer, then a value-only pass
that regenerates every layer's input, mask and seeded noise — the same estimate as keeping them."""
import numpy as np
import pytest

from dualnet import rules


def _models(tiny):
    return {"mlp": tiny.mlp(), "mlp-bn": tiny.mlp(batch_norm=True), "mlp-heads": tiny.mlp(local_heads=True),
            "mixer": tiny.mixer()}


@pytest.mark.parametrize("model_name, name, options", [
    ("mlp", "fg-a", {}), ("mlp-bn", "fg-a", {}), ("mixer", "fg-a", {}),
    ("mlp-heads", "lg-fg-a", {}), ("mixer", "lg-fg-a", {}),
    ("mlp-bn", "fg-a", {"site": "post"}), ("mixer", "lg-fg-a", {"directions": 3, "norm_grad": False}),
])
def test_recompute_equals_store_with_the_same_noise(tiny, model_name, name, options):
    model = _models(tiny)[model_name]
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    recompute = rules.create(name, memory="recompute", **options)
    store = rules.create(name, memory="store", **options)
    kept = store(model, params, x, labels, np.random.default_rng(7), model.init_state(np.float64))  # same keyed noise
    again = recompute(model, params, x, labels, np.random.default_rng(7), model.init_state(np.float64))
    assert kept.grads.keys() == again.grads.keys()
    for key in kept.grads:
        np.testing.assert_allclose(again.grads[key], kept.grads[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert again.loss == kept.loss


def test_recompute_draws_fresh_noise_each_step(tiny):
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    rule = rules.create("fg-a", memory="recompute")
    rng = np.random.default_rng(0)
    first, second = (rule(model, params, x, labels, rng).grads for _ in range(2))
    assert not np.allclose(first["blocks.0.linear.weight"], second["blocks.0.linear.weight"])


def test_unknown_memory_mode_is_refused():
    with pytest.raises(ValueError, match="memory='disk'.*'store'.*'recompute'"):
        rules.create("fg-a", memory="disk")


@pytest.mark.parametrize("model_name", ["mlp-heads", "mixer"])
@pytest.mark.parametrize("name", ["fg-w", "lg-fg-w"])
def test_fg_w_draws_each_tangent_once_in_the_pass_and_once_for_the_update(tiny, monkeypatch, model_name, name):
    """FG-W keeps no tangent: each perturbed tensor's tangent is drawn when its layer runs and drawn
    again, from the same key, for the update (memory flat in depth) — never more often."""
    from collections import Counter

    from dualnet.rules import forward
    model = _models(tiny)[model_name]
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    draws, in_pass = Counter(), {}
    original_tangent, original_forward = forward._PerturbedParams.tangent, model.forward

    def tangent(self, tensor):
        draws[tensor] += 1
        return original_tangent(self, tensor)

    def forward_pass(*args, **kwargs):
        trace = original_forward(*args, **kwargs)
        in_pass.update(draws)
        return trace
    monkeypatch.setattr(forward._PerturbedParams, "tangent", tangent)
    monkeypatch.setattr(model, "forward", forward_pass)
    estimate = rules.create(name)(model, params, x, labels, np.random.default_rng(0), model.init_state(np.float64))
    perturbed = {tensor for tensor in estimate.grads if not model.specs[tensor].head}
    assert perturbed and set(in_pass) == perturbed and set(in_pass.values()) == {1}
    assert set(draws) == perturbed and set(draws.values()) == {2}
