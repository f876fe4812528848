"""Forward and reverse mode over the primitive table, and user-defined rules.

* ``jvp(f, primals, tangents) -> (out, out_tangent)`` — forward mode: one pass with Duals.
* ``vjp(f, *primals) -> (out, pullback)`` — reverse mode: the pass records a tape of nodes
  (only for values that depend on the primals) and ``pullback`` walks it backwards.
* ``grad``, ``value_and_grad``, ``linearize`` are built from those two.
* ``custom_jvp`` / ``custom_vjp`` / ``Primitive`` add rules (FA's backward weights, DFA/FDFA
  feedback injection and fused losses plug in here).

Arguments and outputs may be pytrees: nested tuples, lists and dicts of arrays.

The transformations nest in any combination (``grad(grad(f))``, ``jvp`` of ``grad`` for a
Hessian-vector product, ``vjp`` of ``jvp``...).  Each call perturbs its inputs with a fresh tag,
larger than any tag alive outside it; inside, a Dual of another tag is a constant, so an inner
derivative never picks up an outer perturbation.  The results of an inner call are Duals of the
outer tags, which the outer call differentiates in turn.
"""
import itertools

import numpy

from . import backend
from . import primitives as P
from .dual import Dual, Node, _as_float_array, value_of
from .gradients import Outer, formed
from .primitives import Primitive

_TAGS = itertools.count(1)  # tag 0: Duals built by hand


# ---------------------------------------------------------------------------------------
# pytrees: tuples, lists, dicts (sorted keys) of leaves
# ---------------------------------------------------------------------------------------
def tree_flatten(tree):
    """``tree -> (leaves, rebuild)`` with ``rebuild(leaves)`` restoring the structure."""
    if isinstance(tree, (tuple, list)):
        flats = [tree_flatten(x) for x in tree]
        kind = type(tree)
        return _join(flats, lambda parts: kind(parts))
    if isinstance(tree, dict):
        keys = sorted(tree)
        flats = [tree_flatten(tree[k]) for k in keys]
        return _join(flats, lambda parts: dict(zip(keys, parts)))
    return [tree], lambda leaves: leaves[0]


def _join(flats, build):
    leaves, sizes = [], []
    for leaf_list, _ in flats:
        leaves.extend(leaf_list)
        sizes.append(len(leaf_list))

    def rebuild(new_leaves):
        parts, start = [], 0
        for (_, sub), n in zip(flats, sizes):
            parts.append(sub(new_leaves[start:start + n]))
            start += n
        return build(parts)
    return leaves, rebuild


def tree_map(fn, tree, *rest):
    leaves, rebuild = tree_flatten(tree)
    others = [tree_flatten(r)[0] for r in rest]
    return rebuild([fn(*xs) for xs in zip(leaves, *others)])


# ---------------------------------------------------------------------------------------
# forward mode
# ---------------------------------------------------------------------------------------
def _writeable(array):
    """``array``, or a copy of it when it is a read-only view (rules may return broadcast views)."""
    flags = getattr(array, "flags", None)
    return array.copy() if flags is not None and not getattr(flags, "writeable", True) else array


def _primal_at(x, tag):
    """The value of ``x`` at level ``tag``: a Dual of that tag gives its value (possibly a Dual of an
    outer tag), anything else is a constant of this level and is itself."""
    return x.value if isinstance(x, Dual) and x.tag == tag else x


def _tangent_at(out, tag, directions):
    """The tangent of ``out`` at level ``tag``, materialised (symbolic zero -> zeros) for the user."""
    tangent = out.tangent if isinstance(out, Dual) and out.tag == tag else None
    value = _primal_at(out, tag)
    if tangent is None:
        array = value_of(value)
        module = backend.namespace(array)
        array = module.asarray(array)
        return module.zeros(((directions,) if directions else ()) + array.shape, array.dtype)
    if directions and tangent.ndim == value.ndim:
        tangent = P.broadcast_to(tangent, (directions,) + value.shape)
        return tangent if isinstance(tangent, Dual) else tangent.copy()
    return tangent if isinstance(tangent, Dual) else _writeable(tangent)


def _perturbed(p, tag):
    """Primal ``p`` as a Dual of level ``tag`` (a Dual of an outer level is kept as the value)."""
    return Dual._make(p if isinstance(p, Dual) else _as_float_array(p), None, None, tag)


def _check_sequence(name, what, seq, example):
    if not isinstance(seq, (tuple, list)):
        raise TypeError(f"{name}: {what} must be a tuple or list with one entry per argument of f, "
                        f"e.g. {example}; got {type(seq).__name__}")


def jvp(f, primals, tangents):
    """Forward mode: ``(f(*primals), J_f(primals) · tangents)`` in one pass.

    ``primals`` and ``tangents`` are tuples or lists (of pytrees) of the same structure, one
    entry per argument of ``f``: ``jvp(f, (x,), (v,))``.  Each tangent leaf has the primal's
    shape, or ``(K,) + shape`` to push K directions at once, in which case every output tangent
    has a leading K axis.  A ``None`` tangent is a symbolic zero.  A tangent is cast to its
    primal's float dtype (the primal's precision is the computation's).
    """
    _check_sequence("jvp", "primals", primals, "jvp(f, (x,), (v,))")
    _check_sequence("jvp", "tangents", tangents, "jvp(f, (x,), (v,))")
    primals, tangents = tuple(primals), tuple(tangents)
    p_leaves, rebuild = tree_flatten(primals)
    t_leaves, _ = tree_flatten(tangents)
    if len(p_leaves) != len(t_leaves):
        raise ValueError(f"jvp: {len(p_leaves)} primal leaves but {len(t_leaves)} tangent leaves")
    tag = next(_TAGS)
    directions = set()
    duals = []
    for i, (p, t) in enumerate(zip(p_leaves, t_leaves)):
        d = _perturbed(p, tag)
        if t is not None:
            if not isinstance(t, Dual):
                t = backend.namespace(value_of(d)).asarray(t)
                if not numpy.issubdtype(t.dtype, numpy.floating):
                    raise TypeError(f"jvp: tangent {i} must be real floating point, got dtype {t.dtype}")
            if t.shape == d.shape:
                pass
            elif t.ndim == d.ndim + 1 and t.shape[1:] == d.shape and t.shape[0] >= 1:
                directions.add(t.shape[0])
            else:
                raise ValueError(f"jvp: tangent {i} has shape {t.shape}; expected the primal shape {d.shape} "
                                 f"or (K,) + {d.shape} with K >= 1 directions")
            d.tangent = t.astype(d.dtype) if t.dtype != d.dtype else t
        duals.append(d)
    if len(directions) > 1:
        raise ValueError(f"jvp: tangents disagree on the number of directions K: {sorted(directions)}")
    k = directions.pop() if directions else None
    out = f(*rebuild(duals))
    return tree_map(lambda o: _primal_at(o, tag), out), tree_map(lambda o: _tangent_at(o, tag, k), out)


def linearize(f, *primals):
    """``(f(*primals), jvp_fn)``: ``jvp_fn(*tangents)`` is the JVP at ``primals``.

    Forward mode keeps no tape, so each call of ``jvp_fn`` re-runs the forward pass.
    """
    return f(*primals), lambda *tangents: jvp(f, primals, tangents)[1]


# ---------------------------------------------------------------------------------------
# reverse mode
# ---------------------------------------------------------------------------------------
def _topological(roots):
    order, seen, stack = [], set(), [(r, False) for r in roots]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node.parents if p is not None and id(p) not in seen)
    return order


def backward(outputs, cotangents):
    """Propagate ``cotangents`` from taped ``outputs`` (Duals); returns ``{id(leaf): cotangent}``.

    A rule may return a weight's cotangent as ``gradients.Outer`` factors (matmul does); it stays
    so only where it reaches a leaf alone, and is formed before any rule or sum reads it."""
    grads = {}
    roots = []
    for o, g in zip(outputs, cotangents):
        if isinstance(o, Dual) and o.node is not None and g is not None:
            grads[id(o.node)] = g if id(o.node) not in grads else grads[id(o.node)] + g
            roots.append(o.node)
    for node in reversed(_topological(roots)):
        g = grads.get(id(node))
        if g is None or node.primitive is None:
            continue
        needed = [p is not None for p in node.parents]
        arg_grads = node.primitive.vjp(g, node.out, node.args, node.params, needed, node.residuals)
        for parent, arg_grad in zip(node.parents, arg_grads):
            if parent is None or arg_grad is None:
                continue
            key = id(parent)
            if parent.primitive is not None or key in grads:
                arg_grad = formed(arg_grad)
            grads[key] = arg_grad if key not in grads else formed(grads[key]) + arg_grad
        if node.parents:
            del grads[id(node)]
    return grads


def vjp(f, *primals, factored=False):
    """Reverse mode: ``(out, pullback)`` with ``pullback(cotangent) -> tuple of input cotangents``.

    ``cotangent`` has the structure and shapes of ``out`` (host arrays are moved to the output's
    device); the result has one entry per primal (pytrees allowed).  Inputs the output does not
    depend on get zeros.  ``factored=True``: an input that is a matrix multiplied once by rows x
    may get its cotangent xᵀg as ``gradients.Outer(x, g)``, not formed (for gradients handed to
    an optimiser, which can add it into the weight by one GEMM); otherwise every cotangent is an
    array (or a Dual, nested).
    """
    p_leaves, rebuild = tree_flatten(primals)
    tag = next(_TAGS)
    leaves = []
    for p in p_leaves:
        d = _perturbed(p, tag)
        d.node = Node(None, (), (), {}, d.value)
        leaves.append(d)
    out = f(*rebuild(leaves))
    out_leaves, _ = tree_flatten(out)
    values = tree_map(lambda o: _primal_at(o, tag), out)

    def pullback(cotangent):
        g_leaves, _ = tree_flatten(cotangent)
        if len(g_leaves) != len(out_leaves):
            raise ValueError(f"vjp: cotangent has {len(g_leaves)} leaves, output has {len(out_leaves)}")
        roots, moved = [], []
        for o, g in zip(out_leaves, g_leaves):
            shape = numpy.shape(value_of(o))
            if g is not None and numpy.shape(value_of(g)) != shape:
                raise ValueError(f"vjp: cotangent shape {numpy.shape(value_of(g))} does not match output shape "
                                 f"{shape}")
            # a host cotangent (numpy.ones(()) for a scalar loss) moves to the output's device
            moved.append(g if g is None or isinstance(g, Dual) else backend.namespace(value_of(o)).asarray(g))
            roots.append(o if isinstance(o, Dual) and o.tag == tag else None)
        grads = backward(roots, moved)
        result = []
        for leaf in leaves:
            g = grads.get(id(leaf.node))
            if g is None:
                result.append(backend.namespace(value_of(leaf)).zeros(leaf.shape, leaf.dtype))
            elif isinstance(g, Dual):
                result.append((g if g.dtype == leaf.dtype else g.astype(leaf.dtype)).reshape(leaf.shape))
            elif factored and isinstance(g, Outer) and g.shape == leaf.shape and g.dtype == leaf.dtype:
                result.append(g)
            else:
                g = formed(g)
                result.append(_writeable(backend.namespace(g).asarray(g, dtype=leaf.dtype).reshape(leaf.shape)))
        return rebuild(result)
    return values, pullback


def value_and_grad(f, argnums=0):
    """``(f(*args), ∇f)`` for scalar-valued ``f``; ``argnums`` an int or a tuple of ints."""
    def wrapped(*args):
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        def partial(*chosen):
            full = list(args)
            for i, c in zip(nums, chosen):
                full[i] = c
            return f(*full)
        out, pullback = vjp(partial, *(args[i] for i in nums))
        if numpy.ndim(value_of(out)) != 0:
            raise ValueError(f"grad: f must return a scalar, got shape {numpy.shape(value_of(out))}")
        grads = pullback(backend.namespace(value_of(out)).ones_like(value_of(out)))
        return out, grads[0] if isinstance(argnums, int) else grads
    return wrapped


def grad(f, argnums=0):
    """The gradient of scalar-valued ``f`` with respect to argument(s) ``argnums``."""
    value_and_grad_f = value_and_grad(f, argnums)
    return lambda *args: value_and_grad_f(*args)[1]


# ---------------------------------------------------------------------------------------
# user-defined rules
# ---------------------------------------------------------------------------------------
def _forward_through(f):
    """A joint jvp rule obtained by running ``f`` on Duals (forward mode through its body)."""
    def rule(tangents, out, *args):
        duals = [Dual._make(a, t) if backend.is_array(a) else a for a, t in zip(args, tangents)]
        result = f(*duals)
        return result.tangent if isinstance(result, Dual) else None
    return rule


def _reverse_through(f):
    """A joint vjp rule obtained by reverse mode through ``f``'s body."""
    def rule(g, out, *args):
        positions = [i for i, a in enumerate(args) if backend.is_array(a)]
        def on_arrays(*arrays):
            full = list(args)
            for i, a in zip(positions, arrays):
                full[i] = a
            return f(*full)
        _, pullback = vjp(on_arrays, *(args[i] for i in positions))
        grads = dict(zip(positions, pullback(g)))
        return [grads.get(i) for i in range(len(args))]
    return rule


def custom_vjp(f):
    """Give ``f`` (written with dualnet ops) a hand-written reverse rule.

    Forward mode still differentiates ``f``'s body.  Register the rule with
    ``@f.defvjp`` on a function ``(cotangent, out, *args) -> tuple of cotangents``
    (``None`` for arguments without one).  Used e.g. by feedback alignment, whose backward
    pass uses fixed random weights B instead of Wᵀ.
    """
    primitive = Primitive(getattr(f, "__name__", "custom_vjp"), f, jvp=_forward_through(f))

    def defvjp(rule):
        primitive.vjp_rule = rule
        return rule
    primitive.defvjp = defvjp
    return primitive


def custom_jvp(f):
    """Give ``f`` a hand-written forward rule; reverse mode differentiates ``f``'s body.

    Register with ``@f.defjvp`` on ``(tangents, out, *args) -> out_tangent`` where each
    tangent is ``None`` (symbolic zero) or carries a leading direction axis K.
    """
    primitive = Primitive(getattr(f, "__name__", "custom_jvp"), f, vjp=_reverse_through(f))

    def defjvp(rule):
        primitive.jvp_rule = rule
        return rule
    primitive.defjvp = defjvp
    return primitive


def checkpoint(f, name=None):
    """``f`` with activation checkpointing (rematerialisation) in reverse mode.

    ``checkpoint(f)(*args)`` returns ``f(*args)``.  On a reverse-mode tape the call is recorded as
    one node that keeps only its inputs and its output: ``f``'s body runs on plain arrays, so none
    of its intermediate values is kept.  The node's backward rule re-runs ``f``'s body under
    ``vjp`` and pulls the cotangent back through that fresh tape, which is dropped once the
    cotangents of the inputs are out:

        forward:  y = f(x, θ)                   (intermediates of f discarded)
        backward: (x̄, θ̄) = vjp(f, x, θ)[1](ȳ)    (f evaluated a second time)

    So a network split into S segments stores S segment boundaries plus one segment's
    intermediates at a time, for one extra forward pass; with S ≈ √L for L equal layers, the
    memory of the activations grows like √L instead of L.  Forward mode differentiates ``f``'s
    body as usual.  Positional array arguments only; the cotangents equal those of ``f`` itself.
    The backward pass computes a cotangent for every array argument, so pass constants (a data
    batch) through a closure rather than as arguments.
    """
    return Primitive(name or f"checkpoint({getattr(f, '__name__', 'f')})", f,
                     jvp=_forward_through(f), vjp=_reverse_through(f))
