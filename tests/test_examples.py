"""The educational examples run and print their conclusions (each in a fresh interpreter).

Every ``CHECK`` line an example prints must end in ``OK``, and the checks that carry each
example's message must be among them.
"""
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

