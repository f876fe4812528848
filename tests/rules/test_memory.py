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
@pytest.mark.parametrize("memory, draws_per_tensor", [("store", 1), ("recompute", 2)])
def test_fg_w_draws_each_tangent_once_in_the_pass(tiny, monkeypatch, model_name, name, memory, draws_per_tensor):
    """FG-W draws each perturbed tensor's tangent when its layer runs; ``memory='store'`` keeps it for
    the update, ``'recompute'`` draws it again from the same key (memory flat in depth)."""
    from collections import Counter

    from dualnet.rules import forward
    model = _models(tiny)[model_name]
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    draws, in_pass = Counter(), {}
    original_draw, original_forward = forward.noise.normal, model.forward

    def draw(key, *args, **kwargs):
        draws[key] += 1
        return original_draw(key, *args, **kwargs)

    def forward_pass(*args, **kwargs):
        trace = original_forward(*args, **kwargs)
        in_pass.update(draws)
        return trace
    monkeypatch.setattr(forward.noise, "normal", draw)
    monkeypatch.setattr(model, "forward", forward_pass)
    estimate = rules.create(name, memory=memory)(model, params, x, labels, np.random.default_rng(0),
                                                 model.init_state(np.float64))
    perturbed = [tensor for tensor in estimate.grads if not model.specs[tensor].head]
    assert perturbed and len(in_pass) == len(perturbed) and set(in_pass.values()) == {1}
    assert len(draws) == len(perturbed) and set(draws.values()) == {draws_per_tensor}


@pytest.mark.parametrize("name, options", [("fg-w", {}), ("lg-fg-w", {"directions": 3}),
                                           ("fg-w", {"readout": "perturbed", "noise": "rademacher"})])
def test_fg_w_store_equals_recompute(tiny, name, options):
    model = tiny.mixer()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    store, recompute = (rules.create(name, memory=memory, **options)(model, params, x, labels,
                                                                      np.random.default_rng(3),
                                                                      model.init_state(np.float64)).grads
                        for memory in ("store", "recompute"))
    assert store.keys() == recompute.keys()
    for key in store:
        np.testing.assert_array_equal(store[key], recompute[key], err_msg=key)


def test_fg_w_memory_is_store_or_recompute():
    with pytest.raises(ValueError, match="memory='keep'; allowed: 'store'"):
        rules.create("fg-w", memory="keep")
