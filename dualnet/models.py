"""Model registry: ``dualnet.models.create(name, **options)``."""
import difflib
import inspect

from .nn.cnn import FDFACNN, BaydinCNN
from .nn.localmixer import LocalMixer
from .nn.mlp import MLP
from .nn.resnet import ResNet18

MODELS = {"mlp": MLP, "localmixer": LocalMixer, "cnn-fdfa": FDFACNN, "cnn-baydin": BaydinCNN, "resnet18": ResNet18}


def register(name, cls):
    MODELS[name] = cls


def create(name, **options):
    """Build a model by name; options are the model class's keyword arguments.

    ``input_shape`` (C, H, W) and ``num_classes`` normally come from the dataset.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"models.create: unknown model {name!r}; available: {sorted(MODELS)}.{hint}")
    try:
        return MODELS[name](**options)
    except TypeError as error:
        raise ValueError(f"models.create({name!r}): {error}") from None


def names():
    return sorted(MODELS)


def options(name):
    """``{option: default}`` of model ``name``'s keyword arguments (``inspect.Parameter.empty`` when
    it has none); the CLI parses ``--model-opt`` values by the default's type."""
    if name not in MODELS:
        raise ValueError(f"models.options: unknown model {name!r}; available: {sorted(MODELS)}")
    return {p.name: p.default for p in inspect.signature(MODELS[name]).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
