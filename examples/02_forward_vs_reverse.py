"""Forward vs reverse mode: the Jacobian of f: Rⁿ -> Rᵐ, column by column or row by row.

f(x) = tanh(A₂ tanh(A₁ x)) with A₁ (h × n), A₂ (m × h), h = 64.  Its Jacobian
J = diag(1 - y²) A₂ diag(1 - z²) A₁ (m × n), with z = tanh(A₁ x), y = tanh(A₂ z), is built three ways:

* forward mode, n passes: column i is the JVP J·eᵢ (``dualnet.jvp`` with tangent eᵢ);
* reverse mode, m passes: row j is the VJP eⱼᵀ·J (one taped pass, then m pullbacks);
* forward mode, one pass with K = n batched directions (tangent = the identity, shape (n, n)).

All three must agree with the analytic J.  Forward mode costs grow with n (inputs), reverse mode
costs with m (outputs): forward wins for "tall" Jacobians (n ≪ m), reverse for "wide" ones
(n ≫ m, e.g. a scalar loss of many weights), and batching the n directions into one pass beats
n separate passes.  Timings are the best of 3 runs and are printed, not checked: they depend on
the machine and its load, and only the agreement of the Jacobians is asserted.

Run: ``python examples/02_forward_vs_reverse.py`` (a few seconds).
"""
import time

import numpy as np

import dualnet as dn

HIDDEN = 64
SHAPES = [(4, 256), (16, 128), (64, 64), (128, 16), (256, 4)]  # (n inputs, m outputs)


def make_function(rng, n, m):
    first = rng.standard_normal((HIDDEN, n)) / np.sqrt(n)
    second = rng.standard_normal((m, HIDDEN)) / np.sqrt(HIDDEN)

    def f(x):
        return dn.tanh(second @ dn.tanh(first @ x))

    def jacobian(x):
        z = np.tanh(first @ x)
        y = np.tanh(second @ z)
        return (1 - y * y)[:, None] * second @ ((1 - z * z)[:, None] * first)
    return f, jacobian


def jacobian_forward(f, x):
    """n JVPs, one per input direction eᵢ: the columns of J."""
    basis = np.eye(x.size)
    return np.stack([dn.jvp(f, (x,), (basis[i],))[1] for i in range(x.size)], axis=1)


def jacobian_reverse(f, x):
    """One taped pass, then m pullbacks eⱼᵀ J: the rows of J."""
    out, pullback = dn.vjp(f, x)
    basis = np.eye(out.size)
    return np.stack([pullback(basis[j])[0] for j in range(out.size)], axis=0)


def jacobian_batched(f, x):
    """One forward pass pushing all n directions at once (tangent shape (K, n) with K = n)."""
    _, tangent = dn.jvp(f, (x,), (np.eye(x.size),))  # tangent[k] = J e_k, shape (K, m)
    return tangent.T


def best_of(fn, repeats=3):
    result, best = None, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main():
    rng = np.random.default_rng(0)
    ok = True
    print(f"f(x) = tanh(A2 tanh(A1 x)), hidden width {HIDDEN}, float64.")
    print(f"{'n':>5} {'m':>5} | {'forward (n passes)':>19} {'reverse (m passes)':>19} "
          f"{'forward K=n (1 pass)':>21} | max |error|")
    timings = {}
    for n, m in SHAPES:
        f, jacobian = make_function(rng, n, m)
        x = rng.standard_normal(n)
        exact = jacobian(x)
        results = {name: best_of(lambda method=method: method(f, x))
                   for name, method in [("forward", jacobian_forward), ("reverse", jacobian_reverse),
                                        ("batched", jacobian_batched)]}
        error = max(float(np.abs(j - exact).max()) for j, _ in results.values())
        timings[(n, m)] = {name: t for name, (_, t) in results.items()}
        print(f"{n:>5} {m:>5} | {results['forward'][1] * 1e3:>16.2f} ms {results['reverse'][1] * 1e3:>16.2f} ms "
              f"{results['batched'][1] * 1e3:>18.2f} ms | {error:.1e}")
        status = "OK" if error < 1e-12 else "FAILED"
        ok &= status == "OK"
        print(f"CHECK n={n}, m={m}: forward, reverse and batched Jacobians equal the analytic one "
              f"(max |error| {error:.1e} < 1e-12) {status}")

    tall, wide = timings[SHAPES[0]], timings[SHAPES[-1]]
    print()
    print("Observed on this machine (timings vary with the machine and its load; not checked):")
    print(f"  tall Jacobian (n={SHAPES[0][0]}, m={SHAPES[0][1]}): forward {tall['forward'] * 1e3:.2f} ms, "
          f"reverse {tall['reverse'] * 1e3:.2f} ms (expected: forward faster)")
    print(f"  wide Jacobian (n={SHAPES[-1][0]}, m={SHAPES[-1][1]}): reverse {wide['reverse'] * 1e3:.2f} ms, "
          f"forward {wide['forward'] * 1e3:.2f} ms (expected: reverse faster)")
    print(f"  n={SHAPES[-1][0]} directions: one batched pass {wide['batched'] * 1e3:.2f} ms, n passes "
          f"{wide['forward'] * 1e3:.2f} ms (expected: the batched pass faster)")
    print()
    print("Conclusion: forward mode builds J a column per pass (cost ~ n), reverse mode a row per pass")
    print("(cost ~ m); pushing all n directions through one batched pass amortises the primal work.")
    print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
