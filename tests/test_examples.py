"""The educational examples run and print their conclusions (each in a fresh interpreter).

Every ``CHECK`` line an example prints must end in ``OK``, and the checks that carry each
example's message must be among them.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {  # example: fragments of CHECK lines that must be printed (each ending in OK)
    "01_dual_numbers.py": [
        "CHECK hand-written dual, cubic'(1.5)", "CHECK hand-written dual, bump'(0.5)",
        "CHECK hand-written dual, squashed'(2.0)", "CHECK dualnet.Dual, cubic'(1.5)",
        "CHECK dualnet.Dual, squashed'(2.0)", "CHECK dualnet.jvp, bump' at 6 points",
        "CHECK float32 by default", "CHECK one K=2 pass, dp/dx", "CHECK one K=2 pass, dp/dy"],
    "02_forward_vs_reverse.py": [
        "CHECK n=4, m=256: forward, reverse and batched Jacobians equal the analytic one",
        "CHECK n=256, m=4: forward, reverse and batched Jacobians equal the analytic one",
        "CHECK forward mode is faster for a tall Jacobian", "CHECK reverse mode is faster for a wide Jacobian",
        "CHECK one batched K=n pass beats n separate forward passes"],
    "03_forward_gradient_is_unbiased.py": [
        "CHECK jvp slopes equal ∇f·v", "CHECK gaussian: log-log slope of error vs S",
        "CHECK gaussian: error matches sqrt((d+1)/S)", "CHECK gaussian: unbiased",
        "CHECK rademacher: log-log slope of error vs S", "CHECK rademacher: error matches sqrt((d-1)/S)",
        "CHECK rademacher: unbiased", "CHECK Rademacher directions give a lower error than Gaussian"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_prints_its_conclusions(name):
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                            timeout=180, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith("CHECK")]
    failed = [line for line in checks if not line.endswith(" OK")]
    assert not failed, failed
    for fragment in EXPECTED[name]:
        assert any(line.startswith(fragment) for line in checks), f"{name} did not print {fragment!r}"
    assert result.stdout.rstrip().endswith("ALL CHECKS OK")



def test_mnist_fga_falls_back_to_digits_when_mnist_is_missing_and_offline(tmp_path):
    """The README's first command on a fresh offline machine: it says loudly that MNIST is missing
    and what to do, then still trains LG-FG-A and BP end to end on the bundled digits."""
    pytest.importorskip("sklearn")
    env = {**os.environ, "DUALNET_OFFLINE": "1", "DUALNET_DATA": str(tmp_path / "empty"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(EXAMPLES / "mnist_fga.py"), "--epochs", "2", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=180, env=env,
                            cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "mnist is not available here" in result.stderr and "--data-dir" in result.stderr
    assert "Falling back to the bundled 'digits' dataset" in result.stderr
    assert "LocalMixer M/1/16 on digits" in result.stdout
    errors = [float(line.split("test error")[1].split("%")[0]) for line in result.stdout.splitlines()
              if line.lstrip().startswith(("LG-FG-A", "BP "))]
    assert len(errors) == 2 and max(errors) < 60, result.stdout  # 10 classes: chance is 90% error
    if importlib.util.find_spec("matplotlib"):
        assert f"learning curves of both rules: {tmp_path / 'run' / 'curves.png'}" in result.stdout
        assert (tmp_path / "run" / "curves.png").stat().st_size > 0
