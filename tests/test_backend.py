"""The process-level setting ``import dualnet`` makes: freed heap is kept for the next step."""
import os
import subprocess
import sys
import textwrap

import pytest

from dualnet import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FAULTS = textwrap.dedent("""
    import resource
    import numpy as np
    from dualnet import models, optim, rules
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 128)
    model = models.create("mlp", hidden=800, layers=4, batch_norm=False)
    params, rule, sgd = model.init(0), rules.create("fg-a"), optim.SGD(1e-3)
    step = lambda: sgd.step(params, rule(model, params, x, y, rng).grads)
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def faults_per_step(**env):
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(not backend.keep_freed_memory(), reason="needs glibc's mallopt")
def test_an_fg_a_step_takes_no_fresh_pages():
    # With glibc's defaults the heap shrank at the end of every step and grew again in the next:
    # ~3,400 page faults (13 MB zeroed) per step of this MLP, about a fifth of the step's time.
    assert faults_per_step() < 50
