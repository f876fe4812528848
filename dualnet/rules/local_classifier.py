"""Ren et al.'s "DFA" baseline: every hidden layer learns from a fixed random local classifier.

This is what the row labelled DFA in Ren et al.'s tables runs (their code's ``loss_dfa``): a
stop-gradient after every layer, and for each hidden layer l a fixed random linear classifier
C_l [features_l, classes] on the layer's own post-activation, averaged over the patches
(features_l = mean over the token axis for [N, P, ...] layers, the layer as is for [N, F]).  The
layer follows the exact gradient of that classifier's cross-entropy through itself alone:

    e_l = (softmax(f_l C_l) − onehot) / N,   δ at the post-activation = e_l C_lᵀ spread over the
    P patches (÷ P, the mean's Jacobian),   then the ReLU mask, the norm's Jacobian, and xᵀδ.

It is not Nøkland's DFA (``dfa``: the *output* error sent to every layer through fixed random
matrices), which Bacho & Chu compare against.  C_l is Kaiming-uniform (no bias) from the rule's
``random-local-classifier`` seed stream keyed by the layer (block, name), and never trains.
The read-out gets its exact gradient; the model's local heads, if any, are not used.
"""
import zlib

import numpy

from .. import backend
from ..nn import init as initialisers
from ..nn.plan import Plan
from .base import SEED_STREAMS, Estimate, Rule, mean_value, output_error


def patch_mean(post):
    """[N, P, ...] -> [N, features] averaged over the token axis P; [N, F] as is."""
    n = post.shape[0]
    return (post.mean(axis=1) if post.ndim > 2 else post).reshape(n, -1)


class RandomLocalClassifier(Rule):
    """``dfa-local``: see the module docstring."""

    def setup(self, model, params, seed=0):
        self.seed, self.state = seed, {}

    def _classifier(self, point, features, classes, dtype):
        key = f"C.{point.block}.{point.name}"
        if key not in self.state:
            rng = numpy.random.default_rng([getattr(self, "seed", 0) + SEED_STREAMS["random-local-classifier"],
                                            point.block, zlib.crc32(point.name.encode())])
            self.state[key] = backend.to_device(initialisers.kaiming_uniform(rng, (features, classes), features, dtype))
        return self.state[key]

    def estimate(self, model, params, x, labels, rng, state, batch):
        trace = model.forward(params, x, labels, Plan(), state)
        error = output_error(trace.logits, labels)
        grads = model.readout_grads(trace, error)
        for point in trace.points:
            features = patch_mean(point.post)
            classifier = self._classifier(point, features.shape[1], error.shape[1], features.dtype)
            local_error = output_error(features @ classifier, labels)  # [N, classes]
            delta = local_error @ classifier.T  # at the patch-mean features
            if point.post.ndim > 2:  # the mean over the P patches: each patch gets δ / P
                xp = backend.namespace(delta)
                per_patch = delta.reshape((delta.shape[0], 1) + point.post.shape[2:]) / point.post.shape[1]
                delta = xp.broadcast_to(per_patch, point.post.shape)
            grads.update(point.weight_grads(delta.reshape(point.h.shape) * point.mask))
        return Estimate(grads, mean_value(trace.loss), trace.state)
