"""Cross-entropy over a large vocabulary without the whole float32 logits in memory.

The output projection and the softmax cross-entropy run chunk by chunk of positions inside a
`lax.scan`: each step makes one (B, C, V) block of float32 logits, reduces it to the tokens'
log-sum-exp, target logit and argmax, and drops it. The backward pass (written out with
`jax.custom_vjp`) makes each block again from the saved hidden states and log-sum-exps and
turns it into the hidden states' and the projection's gradients at once. The chunks run
along the sequence, so the batch axis keeps its sharding and every device scans its own rows.

The logits then take one block, not all of them twice (values and gradient): for `lm_8b` on
a v5p-128 a microbatch puts 8 sequences of 4,096 tokens on each chip, 15.7 GiB of float32
logits over its 128,256 entries; chunks of 128 positions hold 0.49 GiB.

Shape suffixes: B batch, L sequence, C positions in a chunk, N chunks, D model width,
V vocabulary.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from scaling.models import context


def _chunks(x_BL, chunk: int):
    """(B, L, ...) as (N, B, C, ...), for a scan over chunks of positions.

    Chunk n holds positions n, n+N, n+2N, ...: strided, so that a sequence split over
    devices (context parallelism) gives every device its share of every chunk, and the scan
    never moves positions between devices. The sums do not depend on the order.
    """
    B, L = x_BL.shape[:2]
    return jnp.moveaxis(x_BL.reshape((B, chunk, L // chunk) + x_BL.shape[2:]), 2, 0)


def _unchunk(x_NBC):
    N, B, C = x_NBC.shape[:3]
    return jnp.moveaxis(x_NBC, 0, 2).reshape((B, C * N) + x_NBC.shape[3:])


def _block(x_BCD, w_DV):
    return jnp.einsum("bcd,dv->bcv", x_BCD, w_DV, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tiled_cross_entropy(x_BLD: jax.Array, w_DV: jax.Array, targets_BL: jax.Array,
                        weights_BL: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Σ weight · cross-entropy, Σ weight · [argmax = target]) of the logits x_BLD @ w_DV,
    equal to the dense computation in float32. `chunk` must divide L."""
    return _forward(x_BLD, w_DV, targets_BL, weights_BL, chunk)[0]


def _forward(x_BLD, w_DV, targets_BL, weights_BL, chunk):
    def step(carry, inputs):
        x_BCD, targets_BC, weights_BC = inputs
        logits_BCV = _block(x_BCD, w_DV)
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        correct_BC = (jnp.argmax(logits_BCV, axis=-1) == targets_BC).astype(jnp.float32)
        loss, correct = carry
        return (loss + jnp.sum(weights_BC * (lse_BC - target_BC)),
                correct + jnp.sum(weights_BC * correct_BC)), lse_BC

    zero = jnp.zeros((), jnp.float32)
    weights_BL = weights_BL.astype(jnp.float32)
    sums, lse_NBC = jax.lax.scan(step, (zero, zero), (_chunks(x_BLD, chunk),
                                                      _chunks(targets_BL, chunk),
                                                      _chunks(weights_BL, chunk)))
    return sums, (x_BLD, w_DV, targets_BL, weights_BL, lse_NBC)


def _backward(chunk, residuals, cotangents):
    x_BLD, w_DV, targets_BL, weights_BL, lse_NBC = residuals
    d_loss = cotangents[0]  # the count of correct predictions has no gradient

    def step(dw_DV, inputs):
        x_BCD, targets_BC, weights_BC, lse_BC = inputs
        probs_BCV = jnp.exp(_block(x_BCD, w_DV) - lse_BC[..., None])
        onehot_BCV = jax.nn.one_hot(targets_BC, w_DV.shape[1], dtype=jnp.float32)
        dlogits_BCV = ((probs_BCV - onehot_BCV) * (weights_BC * d_loss)[..., None]
                       ).astype(x_BCD.dtype)
        dx_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, w_DV,
                            preferred_element_type=jnp.float32).astype(x_BCD.dtype)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", x_BCD, dlogits_BCV,
                                   preferred_element_type=jnp.float32)
        return dw_DV, dx_BCD

    dw_DV, dx_NBCD = jax.lax.scan(
        step, jnp.zeros(w_DV.shape, jnp.float32),
        (_chunks(x_BLD, chunk), _chunks(targets_BL, chunk), _chunks(weights_BL, chunk),
         lse_NBC))
    no_gradient = jnp.zeros(targets_BL.shape, jax.dtypes.float0)
    return (_unchunk(dx_NBCD), dw_DV.astype(w_DV.dtype), no_gradient,
            jnp.zeros_like(weights_BL))


tiled_cross_entropy.defvjp(_forward, _backward)


@flax.struct.dataclass
class Projection:
    """What a language model returns instead of logits when its loss is tiled: the final
    hidden states and the output projection, for `cross_entropy` to meet chunk by chunk.

    With `seq_shards` > 1 the hidden states are in the order that context parallelism gives
    the sequence (`scaling.models.context`), and the targets are reordered to meet them."""
    hidden_BLD: jax.Array
    w_DV: jax.Array
    chunk: int = flax.struct.field(pytree_node=False)
    seq_shards: int = flax.struct.field(pytree_node=False, default=1)

    def cross_entropy(self, targets_BL: jax.Array, weights_BL: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
        if self.seq_shards > 1:
            order = context.balanced_order(targets_BL.shape[1], self.seq_shards)
            targets_BL, weights_BL = targets_BL[:, order], weights_BL[:, order]
        return tiled_cross_entropy(self.hidden_BLD, self.w_DV, targets_BL, weights_BL,
                                   self.chunk)
