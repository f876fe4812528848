"""Gradients as a rule hands them to an optimiser: ``{name: array}``, where the weight gradient
of a linear layer may stay as its two factors until something reads it.

A linear layer's weight gradient is a product W̄ = xᵀ δ of the layer's input rows x [M, p] and
the cotangent rows δ [M, q] at its output (FG-A, DFA, the exact read-out, and the reverse pass of
backprop: ``autodiff.vjp(..., factored=True)``).  Formed on its own, it is written to memory,
then read again by the update W ← W − lr·W̄.  A GEMM can instead add the product into W as it
forms it (C ← α AᵀB + β C, β = 1), which saves one pass over the weights and the [p, q]
temporary: FG-A and BP steps of the MLP 784-800-800-800-10 (batch 128, two threads) take about
0.9× the time (benchmarks/README.md).

* ``Outer(left, right)`` holds such a gradient as its factors; ``outer(left, right)`` makes one
  where the factors are no larger than the product, and forms the product otherwise.
* ``Gradients`` is the mapping a rule's ``Estimate`` carries.  Reading an entry (``grads[name]``,
  ``items()``, ``dict(grads)``) gives a dense array, formed once on first read (``formed`` does
  the same for one value, e.g. of ``linear.param_pullback``).  Only an optimiser asks for
  ``factors(name)``, and it gets them only while nobody has read the entry.
* ``outer_update(factors, out, alpha, beta)`` computes out ← α·leftᵀright + β·out in place: one
  GEMM into ``out`` through the BLAS that NumPy (or CuPy) already uses, where one can be bound
  (kernel module ``outer_update``), else the NumPy composition ``reference_outer_update``.
"""
from collections.abc import MutableMapping

from . import backend


class Outer:
    """The gradient leftᵀ @ right [p, q] of two row matrices left [M, p] and right [M, q]."""
    __slots__ = ("left", "right")

    def __init__(self, left, right):
        if left.ndim != 2 or right.ndim != 2 or left.shape[0] != right.shape[0]:
            raise ValueError(f"Outer: needs row matrices with the same number of rows, got {left.shape} and "
                             f"{right.shape}")
        self.left, self.right = left, right

    @property
    def shape(self):
        return (self.left.shape[1], self.right.shape[1])

    @property
    def dtype(self):
        return backend.namespace(self.left, self.right).result_type(self.left, self.right)

    def dense(self):
        """leftᵀ @ right as an array."""
        return self.left.T @ self.right

    def __repr__(self):
        return f"Outer({self.left.shape[0]} rows -> {self.shape})"


def outer(left, right):
    """leftᵀ @ right for row matrices left [M, p] and right [M, q]: held as ``Outer(left, right)``
    when the factors take no more memory than the product (M·(p + q) ≤ p·q: a batch of rows
    smaller than the layer's widths, as in an MLP), else formed now.  So holding a gradient as
    factors never takes more memory than holding it formed, even where the factors would
    otherwise have been freed (``memory='recompute'``, rows of many patches per example)."""
    rows, p, q = left.shape[0], left.shape[1], right.shape[1]
    return Outer(left, right) if rows * (p + q) <= p * q else left.T @ right


def formed(value):
    """``value`` as an array: an ``Outer`` formed, anything else as it is."""
    return value.dense() if isinstance(value, Outer) else value


class Gradients(MutableMapping):
    """``{name: array or None}`` whose entries may be held as ``Outer`` factors until first read."""

    def __init__(self, entries=()):
        self._entries = dict(entries)

    def __getitem__(self, name):
        value = self._entries[name] = formed(self._entries[name])
        return value

    def __setitem__(self, name, value):
        self._entries[name] = value

    def __delitem__(self, name):
        del self._entries[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def factors(self, name):
        """The ``Outer`` of ``name`` if it is still held as factors (nobody has read it), else None."""
        value = self._entries.get(name)
        return value if isinstance(value, Outer) else None

    def __repr__(self):
        return f"Gradients({self._entries!r})"


def reference_outer_update(left, right, out, alpha, beta):
    """out ← α·leftᵀright + β·out in place; left [M, p], right [M, q], out [p, q] (mixed dtypes
    promote as NumPy's do, and the result is cast into ``out``).

    The product is formed first, then ``out *= β`` (skipped for β = 1) and ``out += α·product``:
    the operations, and so the rounding, of an update from a dense gradient (``param -= lr·g`` is
    α = −lr, β = 1).  The kernels (``outer_update``) run one GEMM with β instead, which rounds
    differently (the product is added into ``out`` as the GEMM forms it).
    """
    product = left.T @ right
    if beta != 1:
        out *= beta
    out += alpha * product if alpha != 1 else product


def outer_update(factors, out, alpha, beta=1.0):
    """out ← α·leftᵀright + β·out for ``factors`` = Outer(left, right), in place (see the module)."""
    left, right = factors.left, factors.right
    if out.shape != factors.shape:
        raise ValueError(f"outer_update: out has shape {out.shape}, the product {factors.shape}")
    update = backend.kernel("outer_update", "outer_update", reference_outer_update, left, right, out)
    update(left, right, out, alpha, beta)
