"""The rule tests' tiny models, for the data-parallel tests."""
from ..rules.conftest import tiny  # noqa: F401
