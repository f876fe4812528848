"""Shared test settings: deterministic hypothesis, float64 by default for derivative checks."""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dualnet", deadline=None, derandomize=True, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("dualnet")


@pytest.fixture
def rng():
    """A fixed-seed NumPy generator: statistical tests are deterministic."""
    return np.random.default_rng(0)
