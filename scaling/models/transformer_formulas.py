"""The transformer's cost formulas: training FLOPs per token and collective bytes per step.

The protocol is in `scaling.models.formulas` (a model's `flops_per_example` and
`collective_bytes`); these are the transformer's, kept beside it rather than in
`scaling.models.transformer`, which holds the model alone. They read only the model's config
and the step's layout. Letters as in `scaling.models.transformer`.
"""

from __future__ import annotations

import ml_collections

from scaling.models import formulas
from scaling.models.transformer import Transformer, TransformerConfig


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token, by the PaLM appendix B convention.

    6·N + 12·num_layers·num_heads·head_dim·seq_len, where N counts the matmul parameters:
    the attention and MLP kernels of every layer plus the D·V output projection (counted
    whether or not it is tied to the embedding, since the logits matmul runs either way).
    N leaves out the input embedding (a gather, no FLOPs) and the norm scales (elementwise).
    The attention term counts QKᵀ and AV over the full L×L square, ignoring the causal mask,
    as PaLM does; MFU computed from it is comparable to published numbers.
    """
    c = config
    attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.embed_dim * c.mlp_dim
    matmul_params = c.num_layers * (attention + mlp) + c.embed_dim * c.vocab_size
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def flops_per_example(model: Transformer, config: ml_collections.ConfigDict, params) -> float:
    """Training FLOPs of one sequence: `flops_per_token` times the tokens that are predicted
    (`data.seq_len`; each example holds one more, the last target)."""
    del params  # the count follows from the config, tied or not
    seq_len = config.data.seq_len
    return flops_per_token(model.config, seq_len) * seq_len


def _scanned(param: formulas.ParamLayout) -> bool:
    return param.path[0] == "layers"


def collective_bytes(model: Transformer, config: ml_collections.ConfigDict,
                     layout: formulas.StepLayout) -> dict[str, float]:
    """Per-device buffer bytes per step by group: `formulas.parameter_collectives` for data
    parallelism and FSDP (the scanned `layers` gathered forward and again backward), plus
    tensor parallelism's activation all-reduces.

    Tensor parallelism: one all-reduce of the layer's activations (tokens × width, compute
    dtype) per matmul whose contraction is split: per layer two in the forward pass
    (attention output, MLP down), two in the backward pass where XLA sums the partial input
    gradients first (TPU) or five where it does not (CPU: query, key, value, gate, up), one
    more when full remat recomputes the attention output; plus, for a vocabulary split over
    `tensor`, the embedding lookup (in the table's dtype) and the input gradient of the
    float32 logits.

    Context parallelism (the sequence split over `layout.sequence_parallel` devices): each
    layer gathers its keys and values whole (a buffer of the local rows' full sequence, local
    key/value heads, compute dtype), again when full remat recomputes the layer, and reduces
    their gradients in the backward pass; the tensor all-reduces above then carry only the
    device's share of the sequence. Whole logits (no `loss_chunk`) are gathered once to put
    them back in order, and their gradient reduced back; the tiled loss reorders the targets
    instead, which costs nothing.

    XLA is free to do otherwise, and preflight's comparison shows where it did: for a small
    embedding table split over fsdp it sends the looked-up rows by all-to-all instead of
    gathering the table and reducing its gradient; under full remat on TPU it may gather a
    layer's weights a third time for the recomputed forward pass; for small batches it may
    move activations rather than weights.
    """
    c = model.config
    compute_itemsize = c.dtype.itemsize
    totals = formulas.parameter_collectives(layout, compute_itemsize=compute_itemsize,
                                            microbatches=config.grad_accum_steps,
                                            scanned=_scanned)
    recompute = 1 if c.remat_policy == "full" else 0
    rows = config.batch_size // layout.data_parallel
    if layout.sequence_parallel > 1:
        kv_bytes = (rows * config.data.seq_len * c.num_kv_heads // layout.mesh_shape["tensor"]
                    * c.head_dim * compute_itemsize)
        totals[formulas.ALL_GATHER] += 2 * (1 + recompute) * kv_bytes * c.num_layers
        totals[formulas.GRADIENTS] += 2 * kv_bytes * c.num_layers
        if not c.loss_chunk:  # whole float32 logits, put back in order for the caller
            vocab_split = max((layout.mesh_shape["tensor"] for p in layout.params
                               if p.path[0] in ("embedding", "output")
                               and "tensor" in p.mesh_axes), default=1)
            logits_bytes = rows * config.data.seq_len * c.vocab_size // vocab_split * 4
            totals[formulas.ALL_GATHER] += logits_bytes
            totals[formulas.GRADIENTS] += logits_bytes  # and their gradient scattered back
    if layout.mesh_shape["tensor"] > 1:
        tokens = rows * config.data.seq_len // layout.sequence_parallel
        backward = 2 if layout.narrow else 5
        per_layer = 2 + backward + recompute
        totals[formulas.GRADIENTS] += (tokens * c.embed_dim * compute_itemsize * per_layer
                                       * c.num_layers)
        for p in layout.params:
            if p.path == ("embedding",) and "tensor" in p.mesh_axes:
                totals[formulas.GRADIENTS] += tokens * c.embed_dim * (p.itemsize + 4)
    return totals
