"""The process-level setting ``import dualnet`` makes: freed heap is kept for the next step."""
import os
import subprocess
import sys
import textwrap

import pytest

from dualnet import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from dualnet import models, optim, rules
    name, shape = sys.argv[1], tuple(int(n) for n in sys.argv[2].split(","))
    options = {"mlp": dict(hidden=800, layers=4, batch_norm=False),
               "localmixer": dict(config="M/8/16", blocks=1, channels=128, groups=4)}[name]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128,) + shape).astype(np.float32), rng.integers(0, 10, 128)
    model = models.create(name, input_shape=shape, **options)
    params, rule, sgd = model.init(0), rules.create("fg-a"), optim.SGD(1e-3)
    step = lambda: sgd.step(params, rule(model, params, x, y, rng).grads)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def faults_per_step(model, shape, **env):
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS, model, shape], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1",
                                            "NUMBA_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(not backend.keep_freed_memory(), reason="needs glibc's mallopt")
@pytest.mark.parametrize("model, shape", [("mlp", "1,28,28"), ("localmixer", "3,32,32")])
def test_a_training_step_takes_no_fresh_pages(model, shape):
    # With glibc's defaults the MLP's heap shrank at the end of every step and grew again in the
    # next (~3,400 page faults, 13 MB zeroed, about a fifth of the step), and the LocalMixer's
    # 4 MB arrays were mapped and unmapped on every allocation.
    assert faults_per_step(model, shape) < 50

