"""Forward plus backward of each piece of the Shakespeare LM's step, XLA against PyTorch.

`lm_tokens.py` says how the whole training step compares; this says where the difference
comes from. Each piece runs at the shapes of one layer of `experiments/shakespeare_char_lm.py`
(batch 32 × 128 tokens, width 128, 4 query and 2 key/value heads of 32, MLP 384, vocabulary
128), as the framework computes it (its own modules and functions, jitted, gradients with
respect to every input) and as PyTorch does (eager, all cores, `.backward()`):

    python bench/lm_pieces.py [--repeats=N] [--json=PATH]

Each figure is the median milliseconds of `repeats` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine_load import cpu_seconds, page_faults, print_load
from results import Contender, write_results

from scaling.models.cpu_attention import attend
from scaling.models.rope import apply_rope
from scaling.models.transformer import Mlp, RMSNorm, TransformerConfig
from scaling.runtime import platforms

CONFIG = TransformerConfig(vocab_size=128, num_layers=4, embed_dim=128, num_heads=4,
                           num_kv_heads=2, head_dim=32, mlp_dim=384, max_seq_len=128)
BATCH, SEQ = 32, 128
REPEATS = 30


def timed(call: Callable[[], object], repeats: int) -> tuple[list[float], float]:
    """Milliseconds of each of `repeats` calls after a warm-up, and the median page faults.

    Faults count fresh memory the kernel maps in: large temporaries that the allocator gave
    back after the previous call. They cost a piece as much as its arithmetic can.
    """
    call()
    times, faults = [], []
    for _ in range(repeats):
        start, start_faults = time.perf_counter(), page_faults()
        call()
        times.append((time.perf_counter() - start) * 1e3)
        faults.append(page_faults() - start_faults)
    return times, statistics.median(faults)


def time_jax(fn: Callable, args: list[np.ndarray], repeats: int) -> tuple[list[float], float]:
    """Milliseconds of jitted forward and backward: the gradient of a weighted sum."""
    def loss(*inputs):
        out = fn(*inputs)
        return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    args = [jnp.asarray(a) for a in args]
    return timed(lambda: jax.block_until_ready(grad(*args)), repeats)


def time_torch(fn: Callable, args: list[np.ndarray], repeats: int) -> tuple[list[float], float]:
    """Milliseconds of eager forward and `.backward()` of the same weighted sum."""
    import torch

    inputs = [torch.from_numpy(a).requires_grad_(a.dtype.kind == "f") for a in args]

    def step():
        for tensor in inputs:
            tensor.grad = None
        out = fn(*inputs)
        weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()

    return timed(step, repeats)


def module_fn(module: nn.Module, example: np.ndarray) -> tuple[Callable, list[np.ndarray]]:
    """A Linen module as a function of (params..., input), and its initial params."""
    params = nn.meta.unbox(module.init(jax.random.key(0), example)["params"])
    leaves, treedef = jax.tree.flatten(params)

    def fn(*inputs):
        return module.apply({"params": jax.tree.unflatten(treedef, inputs[:-1])}, inputs[-1])

    return fn, [np.array(leaf) for leaf in leaves]  # writable, as torch.from_numpy wants


def pieces() -> dict[str, tuple[Callable, Callable, list[np.ndarray]]]:
    """name: (framework function, PyTorch function, inputs), for one layer's shapes."""
    import torch
    import torch.nn.functional as F

    c, rng = CONFIG, np.random.default_rng(0)
    B, L, D, H, K, Dh, Fh = (BATCH, SEQ, c.embed_dim, c.num_heads, c.num_kv_heads,
                             c.head_dim, c.mlp_dim)
    G = H // K

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x_BLD = normal(B, L, D)
    causal_1LS = np.tril(np.ones((L, L), bool))[None]  # one mask shared by every row
    q_BKMDh, k_BKSDh, v_BKSDh = normal(B, K, G * L, Dh), normal(B, K, L, Dh), normal(B, K, L, Dh)

    def torch_attention(q, k, v):
        q = q.reshape(B, K * G, L, Dh)  # query head k·G + g reads kv head k, as in `attend`
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    mlp, mlp_params = module_fn(Mlp(c), x_BLD)  # down, gate, up: flattened in name order

    def torch_mlp(down, gate, up, x):
        x = x.reshape(B * L, D)
        return (F.silu(x @ gate) * (x @ up)) @ down

    norm, norm_params = module_fn(RMSNorm(c), x_BLD)
    positions_BL = np.broadcast_to(np.arange(L), (B, L))
    half = Dh // 2
    angle_Lh = np.arange(L)[:, None] * c.rope_theta ** (-np.arange(half) / half)
    cos, sin = (torch.from_numpy(f(angle_Lh).astype(np.float32))[:, None] for f in (np.cos,
                                                                                 np.sin))

    def torch_rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    hidden_TF = normal(B * L, Fh)
    logits_TV, labels_T = normal(B * L, c.vocab_size), rng.integers(0, c.vocab_size, B * L)
    return {
        "attention core (causal GQA)": (
            lambda q, k, v: attend(q, k, v, causal_1LS), torch_attention,
            [q_BKMDh, k_BKSDh, v_BKSDh]),
        "attention core, autodiff": (
            lambda q, k, v: attend.fun(q, k, v, causal_1LS), torch_attention,
            [q_BKMDh, k_BKSDh, v_BKSDh]),
        "SwiGLU MLP": (mlp, torch_mlp, mlp_params + [x_BLD]),
        "dense (B·L, D) @ (D, F)": (jnp.matmul, torch.matmul,
                                    [x_BLD.reshape(B * L, D), normal(D, Fh, scale=0.1)]),
        "RMSNorm": (norm, lambda scale, x: F.rms_norm(x, (D,), scale, c.norm_eps),
                    norm_params + [x_BLD]),
        "RoPE (queries)": (lambda x: apply_rope(x, positions_BL, c.rope_theta), torch_rope,
                           [normal(B, L, H, Dh)]),
        "SiLU (B·L, F)": (jax.nn.silu, F.silu, [hidden_TF]),
        "GELU tanh (B·L, F)": (jax.nn.gelu, lambda x: F.gelu(x, approximate="tanh"),
                               [hidden_TF]),
        "GELU erf (B·L, F)": (lambda x: jax.nn.gelu(x, approximate=False), F.gelu,
                              [hidden_TF]),
        "cross-entropy (B·L, V)": (
            lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels_T),
            lambda logits: F.cross_entropy(logits, torch.from_numpy(labels_T),
                                           reduction="none"),
            [logits_TV]),
    }


def time_adamw(repeats: int) -> tuple[tuple[list[float], float], tuple[list[float], float]]:
    """One AdamW update of the model's 0.8M parameters: optax, and torch's fused kernel."""
    import torch

    rng = np.random.default_rng(1)
    c = CONFIG
    shapes = [(c.vocab_size, c.embed_dim)] + [
        shape for _ in range(c.num_layers) for shape in (
            (c.embed_dim, c.num_heads * c.head_dim), (c.embed_dim, c.num_kv_heads * c.head_dim),
            (c.embed_dim, c.num_kv_heads * c.head_dim), (c.num_heads * c.head_dim, c.embed_dim),
            (c.embed_dim, c.mlp_dim), (c.embed_dim, c.mlp_dim), (c.mlp_dim, c.embed_dim))]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    tx = optax.adamw(1e-3, weight_decay=0.1)
    update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)), donate_argnums=(0, 1))
    state = [([jnp.asarray(p) for p in params], tx.init([jnp.asarray(p) for p in params]))]
    jax_grads = [jnp.asarray(g) for g in grads]

    def jax_step():
        state[0] = jax.block_until_ready(update(*state[0], jax_grads))

    tensors = [torch.from_numpy(p).requires_grad_() for p in params]
    for tensor, grad in zip(tensors, grads, strict=True):
        tensor.grad = torch.from_numpy(grad)
    optimizer = torch.optim.AdamW(tensors, lr=1e-3, weight_decay=0.1, fused=True)
    return timed(jax_step, repeats), timed(optimizer.step, repeats)


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per piece")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    try:
        import torch
    except ImportError:
        print("pytorch: not installed, so there is nothing to compare with")
        return
    torch.set_num_threads(os.cpu_count() or 1)

    start = cpu_seconds()
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} cores; one "
          f"layer's shapes, forward + backward, median of {args.repeats}", flush=True)
    timings = {name: (time_jax(fn, inputs, args.repeats), time_torch(ref, inputs, args.repeats))
               for name, (fn, ref, inputs) in pieces().items()}
    timings["AdamW update (whole model)"] = time_adamw(args.repeats)
    contenders = []
    print(f"{'piece':<30} {'xla ms':>8} {'torch ms':>9} {'xla / torch':>12} "
          f"{'xla faults':>11} {'torch faults':>13}")
    for name, ((xla_times, xla_faults), (torch_times, torch_faults)) in timings.items():
        xla = Contender(f"{name}: xla", xla_times, extra={"page_faults_per_call": xla_faults})
        ref = Contender(f"{name}: torch", torch_times, baseline=xla,
                        extra={"page_faults_per_call": torch_faults})
        contenders += [xla, ref]
        print(f"{name:<30} {xla.median:>8.2f} {ref.median:>9.2f} {1 / ref.ratio:>11.2f}x "
              f"{xla_faults:>11,.0f} {torch_faults:>13,.0f}")
    share = print_load(start)
    if args.json:
        write_results(args.json, "lm_pieces", "milliseconds", higher_is_better=False,
                      contenders=contenders, others_cpu_share=share,
                      details={"batch": BATCH, "seq_len": SEQ, "repeats": args.repeats,
                               "jax": jax.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    sys.exit(main())
