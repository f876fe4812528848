"""Every model declares what each parameter is (``ParamSpec``): its block or the read-out, local
head or not, group axis, feedback; the queries a partitioner asks (``blocks``, ``parameters_of``)
cover every parameter exactly once."""
import numpy as np
import pytest

from dualnet import models, rules
from dualnet.nn.model import ParamSpec

MODELS = {
    "mlp": dict(input_shape=(1, 4, 4), num_classes=3, hidden=6, layers=3, local_heads=True, batch_norm=True),
    "localmixer": dict(input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2, patches=2, channels=8,
                       groups=2),
    "cnn-fdfa": dict(input_shape=(1, 12, 12), num_classes=3, channels=(2, 3), hidden=4, local_heads=True),
    "cnn-baydin": dict(input_shape=(1, 8, 8), num_classes=3, channels=2, hidden=4, batch_norm=True),
    "resnet18": dict(input_shape=(3, 8, 8), num_classes=3, width=2, aux="mlp", aux_width=4),
}


@pytest.fixture(params=list(MODELS))
def model(request):
    return models.create(request.param, **MODELS[request.param])


def test_blocks_and_readout_partition_the_parameters_in_declaration_order(model):
    assert list(model.blocks()) == list(range(model.num_blocks))
    parts = [model.parameters_of(k) for k in model.blocks()] + [model.parameters_of(None)]
    assert [name for part in parts for name in part] == list(model.specs)
    for k in model.blocks():
        backbone, head = model.parameters_of(k, local_head=False), model.parameters_of(k, local_head=True)
        assert backbone and sorted(backbone + head) == sorted(model.parameters_of(k))
        assert bool(head) == model.has_local_heads
    assert model.parameters_of(None) == ["head.weight", "head.bias"]
    assert all(model.specs[name].readout and model.specs[name].head for name in model.parameters_of(None))


def test_specs_agree_with_the_parameter_names(model):
    """The names stay the checkpoint keys they were: ``blocks.{k}.…`` (local head ``blocks.{k}.head.…``)."""
    for name, spec in model.specs.items():
        assert spec.block == (int(name.split(".")[1]) if name.startswith("blocks.") else None)
        assert spec.local_head == (".head." in name)
        assert spec.feedback == (name.endswith(".weight") and len(spec.shape) >= 2)
        assert spec.role == ("weight" if name.endswith(".weight") else "norm" if ".bn." in name else "bias")


def test_only_the_grouped_layer_declares_a_group_axis(model):
    grouped = {name: spec.group_axis for name, spec in model.specs.items() if spec.group_axis is not None}
    if model.name != "localmixer":
        assert grouped == {}
        return
    assert grouped == {f"blocks.{k}.grouped.{kind}": 0 for k in model.blocks() for kind in ("weight", "bias")}
    for name in grouped:
        assert model.specs[name].shape[0] == model.groups


def test_the_counts_per_block_sum_to_the_model(model):
    counts = model.param_counts()
    assert sum(counts.values()) == model.num_params()
    for k in model.blocks():
        assert counts[k] == sum(int(np.prod(model.specs[n].shape)) for n in model.parameters_of(k))


def test_a_spec_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="role"):
        ParamSpec((2,), 2, "zeros", block=0, role="gain")
    with pytest.raises(ValueError, match="read-out"):
        ParamSpec((2,), 2, "zeros", block=None, role="bias", local_head=True)
    model = models.create("mlp", **MODELS["mlp"])
    with pytest.raises(ValueError, match="twice"):
        model.add_param("head.bias", (3,), 6, "zeros", block=None, role="bias")


def test_rules_declare_whether_they_need_local_heads():
    needs = {name for name in rules.names() if rules.create(name).needs_local_heads}
    assert needs == {"l-bp", "lg-bp", "l-fa", "lg-fa", "lg-fg-w", "lg-fg-a", "guess"}


def test_running_statistics_are_declared_per_block(model):
    state = model.init_state()
    assert [key for k in model.blocks() for key in model.state_of(k)] == list(state)
    for key, (mean, variance) in state.items():
        width = model.running_specs[key].width
        assert mean.shape == variance.shape == (width,) and not mean.any() and (variance == 1).all()
    for k in model.blocks():
        for key in model.state_of(k, local_head=True):
            assert all(model.specs[f"{key}.{p}"].local_head for p in ("gamma", "beta"))
