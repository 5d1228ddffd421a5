"""The logical axis names, declared once.

Models name the axes of their params and activations with these constants only, so a typo in
a model is a NameError at import time rather than an axis that silently stays unsharded. The
config's `sharding_rules` map each name onto mesh axes; `scaling.sharding.mesh` checks that
every rule names one of these (or a name the model itself uses) and that every name a model
uses has a rule.

Activation constraints go through `constrain`, not `nn.with_logical_constraint` directly:
it records the names it sees while a model is traced (see `recording`), which is how the
rule check learns the names that appear only in activations, such as `seq`. An experiment's
own model may use its own names; calling `constrain` lets the check cover its activations too.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import flax.linen as nn

BATCH = "batch"      # examples of a batch
SEQ = "seq"          # positions of a sequence
EMBED = "embed"      # model width
RESIDUAL = "residual"  # model width of the residual stream between layers (an activation)
HEADS = "heads"      # attention heads (query and key/value)
KV = "kv"            # the width of one attention head
MLP = "mlp"          # hidden units of an MLP
VOCAB = "vocab"      # vocabulary entries
LAYERS = "layers"    # the stacked layers of a scanned model
CLASSES = "classes"  # a classifier's outputs

LOGICAL_AXES = (BATCH, SEQ, EMBED, RESIDUAL, HEADS, KV, MLP, VOCAB, LAYERS, CLASSES)

_seen: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("axes_seen",
                                                                        default=None)


def constrain(x, names: Sequence[str | None]):
    """`nn.with_logical_constraint`, recording `names` for the rule check when asked to."""
    seen = _seen.get()
    if seen is not None:
        seen.update(name for name in names if isinstance(name, str))
    return nn.with_logical_constraint(x, tuple(names))


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """Collect the activation names that `constrain` sees while tracing in this block.

    Tracing an init (or `jax.eval_shape` of one) runs the forward pass once, so wrapping the
    abstract init is enough to learn every activation name at no extra cost.
    """
    seen: set[str] = set()
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)
