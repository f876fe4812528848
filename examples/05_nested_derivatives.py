"""Nested derivatives: second derivatives in one pass, Hessian-vector products, and why tags matter.

Part 1, hyper-dual numbers.  Take two infinitesimals ε₁, ε₂ with ε₁² = ε₂² = 0 but ε₁ε₂ ≠ 0.
Evaluating f on x + ε₁ + ε₂ gives

    f(x) + f'(x) ε₁ + f'(x) ε₂ + f''(x) ε₁ε₂,

so one pass yields the second derivative, exactly (Taylor's series stops: every higher power of
(ε₁ + ε₂) vanishes).  A hyper-dual number is a dual number whose parts are dual numbers; dualnet
builds the same thing when one ``jvp`` runs inside another.

Part 2, a Hessian-vector product H v without forming H.  ``jvp(grad(f), (w,), (v,))`` pushes a
tangent v through the reverse pass of f: forward over reverse.  It costs a small multiple of one
gradient, whatever the dimension; H itself would cost one such product per column.

Part 3, perturbation confusion (Siskind and Pearlmutter).  Compute

    d/dx [ x · (d/dy (x + y))(y = 1) ]  at x = 1.

The inner derivative is 1, so the whole is d/dx [x] = 1.  Dual numbers without tags give 2: the
inner derivative adds its ε to x + y, whose ε-part already holds the outer ε of x, and reads
back both.  Giving each derivative its own tag (and treating other tags as constants) fixes it;
dualnet tags every ``jvp``/``vjp``/``grad`` call.

Every number is compared with a closed form; each comparison prints a ``CHECK ... OK`` line.
Run: ``python examples/05_nested_derivatives.py`` (well under a second).
"""
import itertools
import math

import numpy as np

import dualnet as dn


def check(label, got, expected, tolerance):
    """Max |got - expected| <= tolerance * max(1, max |expected|); prints one CHECK line."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    error = float(np.max(np.abs(got - expected)))
    status = "OK" if error <= tolerance * max(1.0, float(np.max(np.abs(expected)))) else "FAILED"
    shown = f"{float(got):.10f} vs {float(expected):.10f}" if got.size == 1 else f"{got.size} entries"
    print(f"CHECK {label}: {shown}, max |error| {error:.1e} (tolerance {tolerance:.0e}) {status}")
    return status == "OK"


# ---------------------------------------------------------------------------------------
# Part 1: hyper-dual numbers by hand (teaching only)
# ---------------------------------------------------------------------------------------
class HyperDual:
    """a + b ε₁ + c ε₂ + d ε₁ε₂ with ε₁² = ε₂² = 0."""

    def __init__(self, a, b=0.0, c=0.0, d=0.0):
        self.a, self.b, self.c, self.d = a, b, c, d

    def __add__(self, other):
        o = _hyper(other)
        return HyperDual(self.a + o.a, self.b + o.b, self.c + o.c, self.d + o.d)

    def __mul__(self, other):  # expand and drop ε₁², ε₂²: the ε₁ε₂ part collects the cross terms
        o = _hyper(other)
        return HyperDual(self.a * o.a, self.a * o.b + self.b * o.a, self.a * o.c + self.c * o.a,
                         self.a * o.d + self.b * o.c + self.c * o.b + self.d * o.a)

    __radd__, __rmul__ = __add__, __mul__


def _hyper(x):
    return x if isinstance(x, HyperDual) else HyperDual(x)


def hyper_exp(x):
    """exp(a + δ) = eᵃ (1 + δ + δ²/2), δ = b ε₁ + c ε₂ + d ε₁ε₂, δ² = 2 b c ε₁ε₂."""
    e = math.exp(x.a)
    return HyperDual(e, e * x.b, e * x.c, e * (x.d + x.b * x.c))


def f_hyper(x):
    return x * x * x * hyper_exp(x)  # f(x) = x³ eˣ


def f_dualnet(x):
    return x * x * x * dn.exp(x)


def f_second(x):
    return (x ** 3 + 6 * x ** 2 + 6 * x) * math.exp(x)  # f''(x)


def part_one(x=0.7):
    ok = True
    print(f"Part 1. f(x) = x^3 e^x at x = {x}; f''(x) = (x^3 + 6x^2 + 6x) e^x = {f_second(x):.10f}")
    out = f_hyper(HyperDual(x, 1.0, 1.0, 0.0))
    print(f"  hyper-dual pass: f = {out.a:.10f}, f' (eps1) = {out.b:.10f}, f' (eps2) = {out.c:.10f}, "
          f"f'' (eps1 eps2) = {out.d:.10f}")
    ok &= check("hyper-dual second derivative in one pass", out.d, f_second(x), 1e-12)
    point, one = np.float64(x), np.float64(1.0)
    jvp_of_jvp = dn.jvp(lambda y: dn.jvp(f_dualnet, (y,), (one,))[1], (point,), (one,))[1]
    ok &= check("dualnet jvp of jvp (a hyper-dual pass) second derivative", float(jvp_of_jvp), f_second(x), 1e-12)
    grad_of_grad = dn.grad(dn.grad(f_dualnet))(point)
    ok &= check("dualnet grad of grad second derivative", float(grad_of_grad), f_second(x), 1e-12)
    return ok


# ---------------------------------------------------------------------------------------
# Part 2: Hessian-vector products
# ---------------------------------------------------------------------------------------
def part_two(n=200, m=50):
    """f(w) = Σ softplus(A w): ∇f = Aᵀ σ(A w), H = Aᵀ diag(σ(1 − σ)) A."""
    ok = True
    rng = np.random.default_rng(0)
    a, w, v = rng.standard_normal((m, n)) / np.sqrt(n), rng.standard_normal(n), rng.standard_normal(n)

    def f(u):
        return dn.sum(dn.logaddexp(0.0, a @ u))  # softplus(z) = log(1 + e^z)

    print(f"Part 2. f(w) = sum softplus(A w), A {m} x {n}: one Hessian-vector product, H never formed.")
    hvp = dn.jvp(dn.grad(f), (w,), (v,))[1]
    s = 1 / (1 + np.exp(-(a @ w)))
    closed_form = a.T @ (s * (1 - s) * (a @ v))
    ok &= check("Hessian-vector product (forward over reverse) equals A^T diag(s(1-s)) A v", hvp, closed_form, 1e-12)
    step = 1e-5  # truncation ~ h^2 times the third derivative ~ 1e-10, rounding ~ eps / h ~ 1e-11
    differences = (dn.grad(f)(w + step * v) - dn.grad(f)(w - step * v)) / (2 * step)
    ok &= check("Hessian-vector product equals finite differences of gradients (h = 1e-5)", hvp, differences, 1e-8)
    return ok


# ---------------------------------------------------------------------------------------
# Part 3: perturbation confusion
# ---------------------------------------------------------------------------------------
class Untagged:
    """A dual number whose parts may be dual numbers, with nothing to tell the levels apart."""

    def __init__(self, value, tangent=0.0):
        self.value, self.tangent = value, tangent

    def __add__(self, other):
        o = other if isinstance(other, Untagged) else Untagged(other)
        return Untagged(self.value + o.value, self.tangent + o.tangent)

    def __mul__(self, other):
        o = other if isinstance(other, Untagged) else Untagged(other)
        return Untagged(self.value * o.value, self.tangent * o.value + self.value * o.tangent)

    __radd__, __rmul__ = __add__, __mul__


def untagged_derivative(f):
    def df(x):
        out = f(Untagged(x, 1.0))
        return out.tangent if isinstance(out, Untagged) else 0.0
    return df


_fresh_tags = itertools.count(1)


class Tagged:
    """A dual number of one derivative (``tag``): a number of any other tag is a constant to it."""

    def __init__(self, value, tangent, tag):
        self.value, self.tangent, self.tag = value, tangent, tag

    def __add__(self, other):
        return _tagged(self, other, lambda a, b: a + b, lambda a, da, b, db: da + db)

    def __mul__(self, other):
        return _tagged(self, other, lambda a, b: a * b, lambda a, da, b, db: da * b + a * db)

    __radd__, __rmul__ = __add__, __mul__


def _parts(x, tag):
    """(value, tangent) of x at level ``tag``: another tag, or a plain number, is a constant."""
    return (x.value, x.tangent) if isinstance(x, Tagged) and x.tag == tag else (x, 0.0)


def _tagged(x, y, value, tangent):
    tag = max(z.tag for z in (x, y) if isinstance(z, Tagged))  # the innermost derivative acts first
    (a, da), (b, db) = _parts(x, tag), _parts(y, tag)
    return Tagged(value(a, b), tangent(a, da, b, db), tag)


def tagged_derivative(f):
    def df(x):
        tag = next(_fresh_tags)
        return _parts(f(Tagged(x, 1.0, tag)), tag)[1]
    return df


def confusion(derivative):
    """d/dx [x · (d/dy (x + y))(y = 1)] at x = 1 with the given derivative operator."""
    return derivative(lambda x: x * derivative(lambda y: x + y)(1.0))(1.0)


def part_three():
    ok = True
    print("Part 3. d/dx [x * (d/dy (x + y))(y=1)] at x = 1; the right answer is 1.")
    ok &= check("untagged dual numbers are confused and give 2", confusion(untagged_derivative), 2.0, 0)
    ok &= check("tagged dual numbers give 1", confusion(tagged_derivative), 1.0, 0)
    one = np.float64(1.0)
    forward = lambda g: lambda x: dn.jvp(g, (x,), (one,))[1]  # noqa: E731
    modes = {"forward": forward, "reverse": dn.grad}
    for outer, inner in itertools.product(modes, modes):
        got = modes[outer](lambda x: x * modes[inner](lambda y: x + y)(one))(one)
        ok &= check(f"dualnet, {outer} over {inner}, gives 1", float(got), 1.0, 0)
    return ok


def main():
    ok = part_one()
    print()
    ok &= part_two()
    print()
    ok &= part_three()
    print()
    print("Conclusion: derivatives of derivatives are exact when each level carries its own tag;")
    print("dualnet nests jvp, vjp and grad in any order, e.g. Hessian-vector products as jvp(grad(f)).")
    print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
