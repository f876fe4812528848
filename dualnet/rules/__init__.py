"""Learning rules: ``dualnet.rules.create(name, **options)``.

| name | family | what it does |
|---|---|---|
| bp, l-bp, lg-bp | backprop | exact gradients of the global / local / local greedy objective |
| fa, l-fa, lg-fa | feedback | backprop with fixed random backward weights |
| dfa, dkp, fdfa | feedback | direct (forward-gradient-learned for FDFA) feedback of the output error |
| fg-w, lg-fg-w | forward | weight-perturbed forward gradient |
| fg-a, lg-fg-a | forward | activity-perturbed forward gradient |
| guess | guesses | Fournier et al.'s gradient guesses × targets |
"""
import difflib

from .backprop import Backprop, FeedbackAlignment
from .base import Estimate, Rule, exact_gradients
from .direct import DirectFeedback
from .forward import ActivityPerturbation, WeightPerturbation
from .guesses import GradientGuess

RULES = {
    "bp": lambda **o: Backprop(target="global", **o),
    "l-bp": lambda **o: Backprop(target="local", **o),
    "lg-bp": lambda **o: Backprop(target="local-greedy", **o),
    "fa": lambda **o: FeedbackAlignment(target="global", **o),
    "l-fa": lambda **o: FeedbackAlignment(target="local", **o),
    "lg-fa": lambda **o: FeedbackAlignment(target="local-greedy", **o),
    "dfa": lambda **o: DirectFeedback(kind="dfa", **o),
    "dkp": lambda **o: DirectFeedback(kind="dkp", **o),
    "fdfa": lambda **o: DirectFeedback(kind="fdfa", **o),
    "fg-w": lambda **o: WeightPerturbation(local=False, **o),
    "lg-fg-w": lambda **o: WeightPerturbation(local=True, **o),
    "fg-a": lambda **o: ActivityPerturbation(local=False, **o),
    "lg-fg-a": lambda **o: ActivityPerturbation(local=True, **o),
    "guess": lambda **o: GradientGuess(**o),
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
