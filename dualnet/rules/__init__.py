"""Learning rules: ``dualnet.rules.create(name, **options)``.

| name | family | what it does |
|---|---|---|
| bp, l-bp, lg-bp | backprop | exact gradients of the global / local / local greedy objective |
| fa, l-fa, lg-fa | feedback | backprop with fixed random backward weights |
| dfa, dkp, fdfa | feedback | direct (forward-gradient-learned for FDFA) feedback of the output error |
| dfa-local | feedback | Ren et al.'s "DFA" row: a fixed random local classifier per hidden layer |
| fg-w, lg-fg-w | forward | weight-perturbed forward gradient |
| fg-a, lg-fg-a | forward | activity-perturbed forward gradient |
| guess | guesses | Fournier et al.'s gradient guesses × targets |
"""
import difflib
import functools
import inspect

from .backprop import Backprop, FeedbackAlignment
from .base import Batch, Estimate, Rule, exact_gradients
from .direct import DFA, DKP, FDFA, DirectFeedback
from .forward import ActivityPerturbation, WeightPerturbation
from .guesses import GradientGuess
from .local_classifier import RandomLocalClassifier

RULES = {
    "bp": functools.partial(Backprop, target="global"),
    "l-bp": functools.partial(Backprop, target="local"),
    "lg-bp": functools.partial(Backprop, target="local-greedy"),
    "fa": functools.partial(FeedbackAlignment, target="global"),
    "l-fa": functools.partial(FeedbackAlignment, target="local"),
    "lg-fa": functools.partial(FeedbackAlignment, target="local-greedy"),
    "dfa": DFA,
    "dkp": DKP,
    "fdfa": FDFA,
    "dfa-local": RandomLocalClassifier,
    "fg-w": functools.partial(WeightPerturbation, local=False),
    "lg-fg-w": functools.partial(WeightPerturbation, local=True),
    "fg-a": functools.partial(ActivityPerturbation, local=False),
    "lg-fg-a": functools.partial(ActivityPerturbation, local=True),
    "guess": GradientGuess,
}


def create(name, **options):
    """Build a rule by name (see the table above); options are the rule's keyword arguments."""
    if name not in RULES:
        close = difflib.get_close_matches(name, RULES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"rules.create: unknown rule {name!r}; available: {', '.join(RULES)}.{hint}")
    try:
        rule = RULES[name](**options)
    except TypeError as error:
        raise ValueError(f"rules.create({name!r}): {error}") from None
    rule.name = name
    return rule


def names():
    return list(RULES)


def options(name):
    """``{option: default}`` of rule ``name``'s options (what ``create(name, **options)`` accepts,
    besides ``diagnostics``); the CLI parses ``--rule-opt`` values by the default's type."""
    if name not in RULES:
        raise ValueError(f"rules.options: unknown rule {name!r}; available: {', '.join(RULES)}")
    fixed = set(getattr(RULES[name], "keywords", {})) | {"diagnostics"}
    return {p.name: p.default for p in inspect.signature(RULES[name]).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed}
