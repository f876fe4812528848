"""The backprop family (reverse mode, the papers' oracles) and feedback alignment.

* ``bp``: end-to-end backprop of the final loss.
* ``l-bp``: local losses added at every block, gradients still flow end to end; the read-out
  is trained on stop-gradient features.
* ``lg-bp``: local greedy — stop-gradient at every block input; each block learns from its own
  local loss.
* ``fa`` / ``l-fa`` / ``lg-fa``: the same three objectives with every weight's reverse pass sent
  through a fixed random matrix B of the weight's shape (Lillicrap et al.); LN, BN and ReLU
  Jacobians stay exact.  Standard FA uses the global loss.
"""
from .. import backend
from ..nn import init as initialisers
from .base import Estimate, Rule, exact_gradients, mean_value, stream_rng


class Backprop(Rule):
    """``contrastive=True``: Ren's contrastive setting (InfoNCE on two views, temperature 0.5)."""

    def __init__(self, target="global", contrastive=False, temperature=0.5, diagnostics=False):
        super().__init__(diagnostics)
        self.target, self.contrastive, self.temperature = target, contrastive, temperature

    def estimate(self, model, params, x, labels, rng, state, batch):
        grads, trace = exact_gradients(model, params, x, labels, self.target, state,
                                       contrastive=self.contrastive, temperature=self.temperature)
        return Estimate(grads, mean_value(trace.loss), trace.state)


class FeedbackAlignment(Rule):
    def __init__(self, target="global", diagnostics=False):
        super().__init__(diagnostics)
        self.target = target

    def setup(self, model, params, seed=0):
        """One fixed random B per weight matrix, drawn like the weight's own initialiser."""
        rng = stream_rng(seed, "feedback-alignment")
        self.state = {}
        for name, spec in model.specs.items():
            if spec.feedback:
                init = initialisers.kaiming_uniform if spec.init == "zeros" else initialisers.get(spec.init)
                self.state[name] = backend.to_device(init(rng, spec.shape, spec.fan_in, params[name].dtype))

    def estimate(self, model, params, x, labels, rng, state, batch):
        if not self.state:
            self.setup(model, params)
        grads, trace = exact_gradients(model, params, x, labels, self.target, state, feedback=self.state)
        return Estimate(grads, mean_value(trace.loss), trace.state)
