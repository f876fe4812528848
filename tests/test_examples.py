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
        "CHECK float32 by default", "CHECK one K=2 pass, dp/dx", "CHECK one K=2 pass, dp/dy",
        "CHECK hand-written dual, reflected'(0.8)", "CHECK float32 dualnet.jvp, bump' at 6 points: float32"],
    "02_forward_vs_reverse.py": [
        "CHECK n=4, m=256: forward, reverse and batched Jacobians equal the analytic one",
        "CHECK n=256, m=4: forward, reverse and batched Jacobians equal the analytic one"],
    "03_forward_gradient_is_unbiased.py": [
        "CHECK jvp slopes equal ∇f·v", "CHECK gaussian: log-log slope of error vs S",
        "CHECK gaussian: error matches sqrt((d+1)/S)", "CHECK gaussian: unbiased",
        "CHECK rademacher: log-log slope of error vs S", "CHECK rademacher: error matches sqrt((d-1)/S)",
        "CHECK rademacher: unbiased", "CHECK Rademacher directions give a lower error than Gaussian"],
    "04_forward_gradient_descent.py": [
        "CHECK jvp's directional derivative equals ∇f·v from reverse mode",
        "CHECK Rosenbrock: GD comes within 0.05 of the minimum within 20,000 iterations",
        "CHECK Rosenbrock: FGD comes within 0.05 of the minimum within 20,000 iterations",
        "CHECK Beale: GD comes within 0.05 of the minimum", "CHECK Beale: FGD comes within 0.05 of the minimum",
        "CHECK d=2: the forward gradient's relative error", "CHECK d=10: the forward gradient's relative error",
        "CHECK d=100: the forward gradient's relative error", "CHECK d=100: unbiased",
        "CHECK the largest stable FGD step shrinks relative to GD's as d grows",
        "CHECK from d=2 to d=100 the ratio grows at least 10×"],
    "05_nested_derivatives.py": [
        "CHECK hyper-dual second derivative in one pass", "CHECK dualnet jvp of jvp (a hyper-dual pass)",
        "CHECK dualnet grad of grad", "CHECK Hessian-vector product (forward over reverse)",
        "CHECK Hessian-vector product equals finite differences of gradients",
        "CHECK untagged dual numbers are confused and give 2", "CHECK tagged dual numbers give 1",
        "CHECK dualnet, forward over forward, gives 1", "CHECK dualnet, forward over reverse, gives 1",
        "CHECK dualnet, reverse over forward, gives 1", "CHECK dualnet, reverse over reverse, gives 1"],
}
PLOTS = {"04_forward_gradient_descent.py"}  # examples that save a figure to --plot


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_prints_its_conclusions(name, tmp_path):
    figure = tmp_path / "figure.png"
    extra = ["--plot", str(figure)] if name in PLOTS else []
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *extra], capture_output=True, text=True,
                            timeout=180, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith("CHECK")]
    failed = [line for line in checks if not line.endswith(" OK")]
    assert not failed, failed
    for fragment in EXPECTED[name]:
        assert any(line.startswith(fragment) for line in checks), f"{name} did not print {fragment!r}"
    assert result.stdout.rstrip().endswith("ALL CHECKS OK")
    if name in PLOTS and importlib.util.find_spec("matplotlib"):
        assert f"plot saved to {figure}" in result.stdout and figure.stat().st_size > 0



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


def test_the_readme_first_code_block_runs_as_pasted():
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120,
                            cwd=EXAMPLES.parent)
    assert result.returncode == 0, block + result.stderr[-2000:]
    namespace = {}
    exec(block, namespace)  # noqa: S102  (our own README)
    np = namespace["np"]
    x0, v = namespace["x0"], namespace["v"]
    tanh = np.tanh(x0)
    gradient = 2 * tanh * (1 - tanh ** 2)
    np.testing.assert_allclose(namespace["gradient"], gradient, rtol=1e-12)
    np.testing.assert_allclose(namespace["directional"], gradient @ v, rtol=1e-12)
    hessian_diagonal = 2 * (1 - tanh ** 2) * (1 - 3 * tanh ** 2)  # f is a sum of functions of one x_i
    np.testing.assert_allclose(namespace["hvp"], hessian_diagonal * v, rtol=1e-12)
