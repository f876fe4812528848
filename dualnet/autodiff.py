"""Forward and reverse mode over the primitive table, and user-defined rules.

* ``jvp(f, primals, tangents) -> (out, out_tangent)`` — forward mode: one pass with Duals.
* ``vjp(f, *primals) -> (out, pullback)`` — reverse mode: the pass records a tape of nodes
  (only for values that depend on the primals) and ``pullback`` walks it backwards.
* ``grad``, ``value_and_grad``, ``linearize`` are built from those two.
* ``custom_jvp`` / ``custom_vjp`` / ``Primitive`` add rules (FA's backward weights, DFA/FDFA
  feedback injection and fused losses plug in here).

Arguments and outputs may be pytrees: nested tuples, lists and dicts of arrays.
"""
import numpy

from . import backend
from .dual import Dual, Node
from .primitives import Primitive


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


def _tangent_of(out, directions):
    """Materialise a Dual's tangent (symbolic zero -> zeros) for returning to the user."""
    if not isinstance(out, Dual):
        out = Dual._make(backend.namespace(out).asarray(out), None)
    if out.tangent is not None:
        if directions and out.tangent.ndim == out.value.ndim:
            return backend.namespace(out.value).broadcast_to(out.tangent, (directions,) + out.shape).copy()
        return _writeable(out.tangent)
    shape = ((directions,) if directions else ()) + out.shape
    return backend.namespace(out.value).zeros(shape, out.dtype)


def jvp(f, primals, tangents):
    """Forward mode: ``(f(*primals), J_f(primals) · tangents)`` in one pass.

    ``primals`` and ``tangents`` are sequences (pytrees) of the same structure; each tangent
    leaf has the primal's shape, or ``(K,) + shape`` to push K directions at once, in which case
    every output tangent has a leading K axis.  A ``None`` tangent is a symbolic zero.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    p_leaves, rebuild = tree_flatten(primals)
    t_leaves, _ = tree_flatten(tangents)
    if len(p_leaves) != len(t_leaves):
        raise ValueError(f"jvp: {len(p_leaves)} primal leaves but {len(t_leaves)} tangent leaves")
    directions = set()
    duals = []
    for i, (p, t) in enumerate(zip(p_leaves, t_leaves)):
        d = Dual(p.value if isinstance(p, Dual) else p)
        if t is not None:
            t = backend.namespace(d.value).asarray(t)
            if t.shape == d.shape:
                pass
            elif t.ndim == d.ndim + 1 and t.shape[1:] == d.shape and t.shape[0] >= 1:
                directions.add(t.shape[0])
            else:
                raise ValueError(f"jvp: tangent {i} has shape {t.shape}; expected the primal shape {d.shape} "
                                 f"or (K,) + {d.shape} with K >= 1 directions")
            d = Dual(d.value, t)
        duals.append(d)
    if len(directions) > 1:
        raise ValueError(f"jvp: tangents disagree on the number of directions K: {sorted(directions)}")
    k = directions.pop() if directions else None
    out = f(*rebuild(duals))
    values = tree_map(lambda o: o.value if isinstance(o, Dual) else o, out)
    return values, tree_map(lambda o: _tangent_of(o, k), out)


def linearize(f, *primals):
    """``(f(*primals), jvp_fn)``: ``jvp_fn(*tangents)`` is the JVP at ``primals``.

    Forward mode keeps no tape, so each call of ``jvp_fn`` re-runs the forward pass.
    """
    out = f(*primals)
    return tree_map(lambda o: o.value if isinstance(o, Dual) else o, out), \
        lambda *tangents: jvp(f, primals, tangents)[1]


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
    """Propagate ``cotangents`` from taped ``outputs`` (Duals); returns ``{id(leaf): cotangent}``."""
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
        arg_grads = node.primitive.vjp(g, node.out, node.args, node.params, needed)
        for parent, arg_grad in zip(node.parents, arg_grads):
            if parent is None or arg_grad is None:
                continue
            key = id(parent)
            grads[key] = arg_grad if key not in grads else grads[key] + arg_grad
        if node.parents:
            del grads[id(node)]
    return grads


def vjp(f, *primals):
    """Reverse mode: ``(out, pullback)`` with ``pullback(cotangent) -> tuple of input cotangents``.

    ``cotangent`` has the structure and shapes of ``out`` (host arrays are moved to the output's
    device); the result has one entry per primal (pytrees allowed).  Inputs the output does not
    depend on get zeros.
    """
    p_leaves, rebuild = tree_flatten(primals)
    leaves = []
    for p in p_leaves:
        d = Dual(p.value if isinstance(p, Dual) else p)
        d.node = Node(None, (), (), {}, d.value)
        leaves.append(d)
    out = f(*rebuild(leaves))
    out_leaves, _ = tree_flatten(out)
    values = tree_map(lambda o: o.value if isinstance(o, Dual) else o, out)

    def pullback(cotangent):
        g_leaves, _ = tree_flatten(cotangent)
        if len(g_leaves) != len(out_leaves):
            raise ValueError(f"vjp: cotangent has {len(g_leaves)} leaves, output has {len(out_leaves)}")
        moved = []
        for o, g in zip(out_leaves, g_leaves):
            value = o.value if isinstance(o, Dual) else o
            if g is not None and numpy.shape(g) != numpy.shape(value):
                raise ValueError(f"vjp: cotangent shape {numpy.shape(g)} does not match output shape "
                                 f"{numpy.shape(value)}")
            # a host cotangent (numpy.ones(()) for a scalar loss) moves to the output's device
            moved.append(None if g is None else backend.namespace(value).asarray(g))
        grads = backward(out_leaves, moved)
        result = []
        for leaf in leaves:
            g = grads.get(id(leaf.node))
            result.append(backend.namespace(leaf.value).zeros_like(leaf.value) if g is None
                          else _writeable(backend.namespace(g).asarray(g, dtype=leaf.dtype).reshape(leaf.shape)))
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
        if numpy.ndim(out) != 0:
            raise ValueError(f"grad: f must return a scalar, got shape {numpy.shape(out)}")
        grads = pullback(backend.namespace(out).ones_like(out))
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
