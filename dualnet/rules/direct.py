"""Direct feedback of the output error: DFA (Nøkland), DKP (Webster et al.), FDFA (Bacho & Chu).

With e = ∂L/∂y the error at the output logits [N, classes] (exact), every hidden layer l gets
δ_l = (e B_l) ⊙ f′(a_l) at its post-activation, carried to its weights by the layer alone; the
read-out gets its exact gradient.  B_l is [classes, units_l]:

* DFA: fixed random (Kaiming-uniform);
* DKP: starts at 0 and learns B_l ← B_l − η_B (eᵀ h_l + λ B_l) (Kolen-Pollack, direct), or by
  Adam on that gradient (``adam=True``, the authors' code: Adam 1e-4 for the feedback matrices);
* FDFA: starts at 0 and learns the output Jacobian from forward gradients: one forward pass
  perturbs every hidden post-activation with u_l ~ N(0, I) per example; the output tangent is
  d = Σ_m J_m u_m, and B_l ← (1−α) B_l + α mean_n(d_n u_{l,n}ᵀ) (an EMA, unbiased for E[J_l]
  since the u_m are independent), or an Adam step on the residual B_l − mean_n(d_n u_{l,n}ᵀ)
  as the authors' code does (``adam=True``).
"""
import numpy

from .. import backend
from ..nn import init as initialisers
from ..nn.plan import Plan
from ..optim import Adam
from .base import Estimate, Rule, mean_value, output_error
from .forward import _gaussian, _tangent


class DirectFeedback(Rule):
    def __init__(self, kind="dfa", alpha=0.1, feedback_lr=1e-4, weight_decay=0.0, adam=False, directions=1,
                 diagnostics=False):
        super().__init__(diagnostics)
        if kind not in ("dfa", "dkp", "fdfa"):
            raise ValueError(f"direct feedback: kind={kind!r}; allowed: 'dfa', 'dkp', 'fdfa'")
        if not 0 < alpha <= 1:
            raise ValueError(f"fdfa: alpha={alpha} must be in (0, 1]")
        if adam and kind == "dfa":
            raise ValueError("dfa: adam=True has nothing to train (DFA's feedback matrices are fixed); "
                             "allowed with 'dkp' and 'fdfa'")
        self.kind, self.alpha, self.feedback_lr = kind, alpha, feedback_lr
        self.weight_decay, self.adam, self.directions = weight_decay, adam, directions
        self.seed = 0
        self._adam = Adam(lr=feedback_lr) if adam else None

    def setup(self, model, params, seed=0):
        self.seed, self.state = seed, {}
        if self.adam:
            self._adam = Adam(lr=self.feedback_lr)

    def state_dict(self):
        """The feedback matrices {'B.…': array}, and the Adam state of their updates under 'adam'."""
        saved = super().state_dict()
        if self._adam is not None:
            saved["adam"] = self._adam.state_dict()
        return saved

    def load_state_dict(self, state):
        state = dict(state)
        adam = state.pop("adam", None)
        super().load_state_dict(state)
        if adam is not None:
            self._adam.load_state_dict(adam)

    def _feedback(self, point, classes, dtype):
        key = f"B.{point.block}.{point.name}"
        if key not in self.state:
            units = int(numpy.prod(point.h.shape[1:]))
            if self.kind == "dfa":
                rng = numpy.random.default_rng(self.seed + 104729 + len(self.state))
                matrix = initialisers.kaiming_uniform(rng, (classes, units), units, dtype)
            else:
                matrix = numpy.zeros((classes, units), dtype)
            self.state[key] = backend.to_device(matrix)
        return key

    def estimate(self, model, params, x, labels, rng, state):
        k = self.directions
        perturb = None
        if self.kind == "fdfa":
            perturb = lambda site: (_gaussian(rng, k, site.shape, site.dtype)
                                    if site.kind == "post" and site.name != "block" else None)
        trace = model.forward(params, x, labels, Plan(perturb=perturb), state)
        error = output_error(trace.logits, labels)
        n, classes = error.shape
        grads = model.readout_grads(trace, error)
        output_tangent = _tangent(trace.logits, k) if self.kind == "fdfa" else None  # [K, N, classes]
        for point in trace.points:
            key = self._feedback(point, classes, error.dtype)
            if self.kind == "fdfa":
                u = point.u_post.reshape(k * n, -1)
                self._learn_jacobian(key, output_tangent.reshape(k * n, classes).T @ u / (k * n))
            delta = (error @ self.state[key]).reshape(point.h.shape) * point.mask
            grads.update(point.weight_grads(delta))
            if self.kind == "dkp":
                activity = point.post.reshape(n, -1)
                self._descend(key, error.T @ activity + self.weight_decay * self.state[key], self.feedback_lr)
        return Estimate(grads, mean_value(trace.loss), trace.state)

    def _learn_jacobian(self, key, sample):
        """FDFA: B toward the one-sample Jacobian estimate ``sample`` = mean_n d_n u_nᵀ (the residual's step)."""
        self._descend(key, self.state[key] - sample, self.alpha)

    def _descend(self, key, gradient, rate):
        """One step of B along −``gradient``: Adam with rate ``feedback_lr`` (``adam=True``), else
        B − rate·gradient (for FDFA with rate α this is the EMA (1−α)B + α·sample)."""
        if self.adam:
            self.state.update(self._adam.step({key: self.state[key]}, {key: gradient}))
        else:
            self.state[key] = self.state[key] - rate * gradient
