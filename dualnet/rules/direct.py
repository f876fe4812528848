"""Direct feedback of the output error: DFA (Nøkland), DKP (Webster et al.), FDFA (Bacho & Chu).

With e = ∂L/∂y the error at the output logits [N, classes] (exact), every hidden layer l gets
δ_l = (e B_l) ⊙ f′(a_l) at its post-activation, carried to its weights by the layer alone; the
read-out gets its exact gradient.  B_l is [classes, units_l]:

* DFA: fixed random (Kaiming-uniform, from the rule's ``direct-feedback`` seed stream);
* DKP: starts at 0 and learns B_l ← B_l − η_B (eᵀ h_l + λ B_l) (Kolen-Pollack, direct), or by
  Adam on that gradient (``adam=True``, the authors' code: Adam 1e-4 for the feedback matrices);
* FDFA: starts at 0 and learns the output Jacobian from forward gradients: one forward pass
  perturbs every hidden post-activation with u_l ~ N(0, I) per example; the output tangent is
  d = Σ_m J_m u_m, and B_l ← (1−α) B_l + α mean_n(d_n u_{l,n}ᵀ) (an EMA, unbiased for E[J_l]
  since the u_m are independent), or an Adam step on the residual B_l − mean_n(d_n u_{l,n}ᵀ)
  as the authors' code does (``adam=True``).
"""
import zlib

import numpy

from .. import backend
from ..nn import init as initialisers
from ..nn.plan import Plan
from ..optim import Adam
from .base import SEED_STREAMS, Estimate, Rule, mean_value, output_error
from .forward import _tangent, example_noise


class DirectFeedback(Rule):
    """What DFA, DKP and FDFA share: one matrix B_l [classes, units_l] per hidden layer, created when
    the layer is first met (``initial_feedback``), and the update δ_l = (e B_l) ⊙ f′(a_l).  A subclass
    says how B starts and how it learns (``perturbation``, ``learn_before_use``, ``learn_after_use``).

    ``adam``: B learns by Adam with rate ``feedback_lr`` on its gradient, else by plain steps."""

    pipeline = "signal"  # every block needs only the output error e [N, classes]

    def __init__(self, adam=False, feedback_lr=1e-4, diagnostics=False):
        super().__init__(diagnostics)
        self.adam, self.feedback_lr = adam, feedback_lr
        self.seed = 0
        self._adam = Adam(lr=feedback_lr) if adam else None

    def setup(self, model, params, seed=0):
        self.seed, self.state = seed, {}
        if self.adam:
            self._adam = Adam(lr=self.feedback_lr)

    def pipeline_refusal(self):
        if self.adam:
            return (f"{self.name} with adam=True is not supported (its Adam state is not gathered across stages); "
                    f"use the default plain steps")
        return super().pipeline_refusal()

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

    def initial_feedback(self, classes, units, dtype, point):
        """B_l of hidden layer ``point`` before any learning: zero (DKP and FDFA learn it)."""
        return numpy.zeros((classes, units), dtype)

    def perturbation(self, rng, batch):
        """The plan's ``perturb`` for the forward pass (None: a plain pass)."""
        return None

    def learn_before_use(self, key, point, signal, batch):
        """Update B (``self.state[key]``) from the forward pass and the ``signal``, before δ is formed
        from it (``batch.mean`` makes a shard's mean the whole batch's)."""

    def learn_after_use(self, key, point, error, batch):
        """Update B from the output error e [N, classes], after δ is formed."""

    def _feedback(self, point, classes, dtype):
        key = f"B.{point.block}.{point.name}"
        if key not in self.state:
            units = int(numpy.prod(point.h.shape[1:]))
            self.state[key] = backend.to_device(self.initial_feedback(classes, units, dtype, point))
        return key

    def estimate(self, model, params, x, labels, rng, state, batch):
        trace = self.forward_pass(model, params, x, labels, rng, state, batch)
        return self.updates(model, params, trace, self.signal(trace, labels), batch)

    def forward_pass(self, model, params, x, labels, rng, state, batch):
        """The forward pass whose hidden layers the updates use (the block pipeline runs it on each
        stage's blocks, then hands every stage the last stage's ``signal``)."""
        return model.forward(params, x, labels, Plan(perturb=self.perturbation(rng, batch)), state)

    def signal(self, trace, labels):
        """What the hidden layers need from the end of the network, a tuple of arrays: the output
        error e = ∂(mean loss)/∂logits [N, classes] (FDFA adds the logits' tangent)."""
        return (output_error(trace.logits, labels),)

    def updates(self, model, params, trace, signal, batch):
        """The estimate from a ``forward_pass`` trace and the ``signal`` (e [N, classes] first): the
        exact read-out gradient (when the trace has the read-out) and δ_l = (e B_l) ⊙ f′(a_l) per layer."""
        error = signal[0]
        classes = error.shape[1]
        grads = {} if trace.logits is None else model.readout_grads(trace, error)
        for point in trace.points:
            key = self._feedback(point, classes, error.dtype)
            self.learn_before_use(key, point, signal, batch)
            delta = (error @ self.state[key]).reshape(point.h.shape) * point.mask
            grads.update(point.weight_grads(delta))
            self.learn_after_use(key, point, error, batch)
        return Estimate(grads, mean_value(trace.loss), trace.state)

    def _descend(self, key, gradient, rate):
        """One step of B along −``gradient``: Adam with rate ``feedback_lr`` (``adam=True``), else
        B − rate·gradient (for FDFA with rate α this is the EMA (1−α)B + α·sample)."""
        if self.adam:
            self.state.update(self._adam.step({key: self.state[key]}, {key: gradient}))
        else:
            self.state[key] = self.state[key] - rate * gradient


class DFA(DirectFeedback):
    """Nøkland's DFA: B_l fixed random.  ``adam`` is refused (there is nothing to train)."""

    def __init__(self, adam=False, diagnostics=False):
        if adam:
            raise ValueError("dfa: adam=True has nothing to train (DFA's feedback matrices are fixed); "
                             "allowed with 'dkp' and 'fdfa'")
        super().__init__(diagnostics=diagnostics)

    def initial_feedback(self, classes, units, dtype, point):
        """Kaiming-uniform, drawn from the ``direct-feedback`` stream keyed by the layer (its block and
        name), so that a block's matrices are the same on whichever process runs it."""
        rng = numpy.random.default_rng([self.seed + SEED_STREAMS["direct-feedback"], point.block,
                                        zlib.crc32(point.name.encode())])
        return initialisers.kaiming_uniform(rng, (classes, units), units, dtype)


class DKP(DirectFeedback):
    """Webster et al.'s direct Kolen-Pollack: B_l ← B_l − η_B (eᵀ h_l + λ B_l), η_B = ``feedback_lr``,
    λ = ``weight_decay`` (or Adam on that gradient with ``adam=True``)."""

    def __init__(self, feedback_lr=1e-4, weight_decay=0.0, adam=False, diagnostics=False):
        super().__init__(adam, feedback_lr, diagnostics)
        self.weight_decay = weight_decay

    def learn_after_use(self, key, point, error, batch):
        activity = point.post.reshape(error.shape[0], -1)
        self._descend(key, batch.mean(error.T @ activity) + self.weight_decay * self.state[key], self.feedback_lr)


class FDFA(DirectFeedback):
    """Bacho & Chu's FDFA: B_l learns the output Jacobian from K forward-gradient directions per
    example at every hidden post-activation: B ← (1−α)B + α·mean(d uᵀ) (``alpha``), or Adam on the
    residual B − mean(d uᵀ) with rate ``feedback_lr`` (``adam=True``).  ``update='before'``: B
    learns from this step's pass before δ_l is formed from it; ``'after'``: δ_l uses the B of the
    previous step and B learns afterwards, as the authors' code does."""
    pipeline_tangents = True  # the pipeline's forward messages carry the perturbed output's tangent

    def __init__(self, alpha=0.1, feedback_lr=1e-4, adam=False, directions=1, update="before", diagnostics=False):
        if not 0 < alpha <= 1:
            raise ValueError(f"fdfa: alpha={alpha} must be in (0, 1]")
        if update not in ("before", "after"):
            raise ValueError(f"fdfa: update={update!r}; allowed: 'before' (B learns, then δ uses it) or 'after' "
                             f"(δ uses the previous B, then B learns; the authors' order)")
        super().__init__(adam, feedback_lr, diagnostics)
        self.alpha, self.directions, self.update = alpha, directions, update
        self._signal = None

    def perturbation(self, rng, batch):
        return example_noise(rng, batch, self.directions, "post")

    def signal(self, trace, labels):
        """e [N, classes] and the logits' tangent [K, N, classes] (every layer's noise through the
        rest of the network)."""
        return output_error(trace.logits, labels), _tangent(trace.logits, self.directions)

    def learn_before_use(self, key, point, signal, batch):
        if self.update == "before":
            self._learn_from_pass(key, point, signal, batch)
        else:
            self._signal = signal

    def learn_after_use(self, key, point, error, batch):
        if self.update == "after":
            self._learn_from_pass(key, point, self._signal, batch)

    def _learn_from_pass(self, key, point, signal, batch):
        """B toward the Jacobian sample of this step's forward-mode pass at ``point`` (``signal``: e and
        the logits' tangent)."""
        k, classes, n = self.directions, self.state[key].shape[0], point.h.shape[0]
        output_tangent = signal[1]  # [K, N, classes]
        u = point.u_post.reshape(k * n, -1)
        self._learn_jacobian(key, batch.mean(output_tangent.reshape(k * n, classes).T @ u / (k * n)))

    def _learn_jacobian(self, key, sample):
        """B toward the one-sample Jacobian estimate ``sample`` = mean_n d_n u_nᵀ (the residual's step)."""
        self._descend(key, self.state[key] - sample, self.alpha)
