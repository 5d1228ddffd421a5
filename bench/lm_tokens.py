"""Training tokens/s of the Shakespeare character LM: the framework against hand-written PyTorch.

The transformer should turn the CPU's FLOPs into tokens about as well as a competent PyTorch
user does, and both should be judged against what the machine can do at all. So one process
on one CPU measures, in order:

    python bench/lm_tokens.py [--steps=N] [--json=PATH]

1. the large-matmul ceiling (`bench/matmul_ceiling.py`): float32 2048³, jitted XLA and torch;
2. the framework through its real compiled multi-step call (`Run.train_steps`, a `lax.scan` of
   `steps_per_call` steps) on real chunks of `experiments/shakespeare_char_lm.py` data;
3. the same architecture, hyperparameters, batches and starting parameters in idiomatic eager
   PyTorch (fused QKV and gate/up projections, `scaled_dot_product_attention`, fused AdamW),
   checked against the framework: parameter count, logits at init, and the per-step losses
   of the first chunk.

Each throughput is the median over timed windows of `steps_per_call` steps after warm-up;
model FLOPs follow `scaling.models.transformer_formulas.flops_per_token` (PaLM convention).
Page faults per step are counted too: fresh temporaries cost time that no FLOP count shows (see
`bench/README.md`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from machine_load import cpu_seconds, page_faults, print_load
from matmul_ceiling import SIZE as MATMUL_SIZE
from matmul_ceiling import ceilings as matmul_ceilings
from results import Check, Contender, write_results

import scaling.config.experiments
import scaling.training.loop
import scaling.training.run
from scaling.data.loader import TrainLoader
from scaling.models.transformer import TransformerConfig
from scaling.runtime import platforms
from scaling.training.state_summary import parameter_count

EXPERIMENT = "shakespeare_char_lm"
DATA_DIR = Path("/work/shared/datasets/tiny_shakespeare")
SCHEDULE_STEPS = 1000  # the experiment's num_steps, so the learning-rate schedule is as shipped
TARGET_RATIO = 1.0  # framework tokens/s over PyTorch's, at least
WARMUP_CALLS = 2  # the first compiles (framework) or allocates (torch); the second settles


def bench_framework(num_steps: int) -> dict[str, Any]:
    """`Run.train_steps` on real chunks, as the training loop calls it, block_until_ready.

    Chunks are placed on the device before the clock starts; the loop overlaps that host work
    with the previous call, so it is not part of the step time. Returns the chunks and the
    initial parameters too, so PyTorch can train on the same data from the same start.
    """
    config, module = scaling.config.experiments.load_config(
        EXPERIMENT, [f"data.manual_dir={DATA_DIR}", f"num_steps={SCHEDULE_STEPS}"])
    k = config.steps_per_call
    num_calls = max(1, -(-num_steps // k))
    if (WARMUP_CALLS + num_calls) * k > SCHEDULE_STEPS:
        raise ValueError(f"--steps={num_steps}: at most "
                         f"{(SCHEDULE_STEPS // k - WARMUP_CALLS) * k} timed steps")
    run, dataset = scaling.training.run.setup(config, module)
    state = run.init()
    init_params = jax.device_get(state.params)  # before the first call donates the state
    rows = np.arange(config.batch_size)  # one process: every row of every batch
    loader = TrainLoader(dataset, config.seed, config.batch_size, rows, 0,
                         (WARMUP_CALLS + num_calls) * k, prefetch_steps=0)
    chunks = [loader.next(k) for _ in range(WARMUP_CALLS + num_calls)]
    placed = [scaling.training.run.put_local_chunk(run, chunk, rows, config.batch_size)
              for chunk in chunks]

    seconds, faults, losses = [], [], []
    for chunk in placed:
        start, start_faults = time.perf_counter(), page_faults()
        state, metrics = run.train_steps(state, chunk)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
        faults.append(page_faults() - start_faults)
        losses.append(np.asarray(metrics["loss"]))
    seq_len = run.items_per_example
    return {"config": config, "model_config": run.model.config, "chunks": chunks,
            "init_params": init_params, "losses": np.concatenate(losses).tolist(),
            "param_count": parameter_count(init_params), "seq_len": seq_len,
            "flops_per_token": run.flops_per_example / seq_len,
            "call_seconds": seconds[WARMUP_CALLS:], "compile_call_seconds": seconds[0],
            "call_page_faults": faults[WARMUP_CALLS:], "steps_per_call": k}


def make_torch_model(c: TransformerConfig):
    """The transformer of `scaling/models/transformer.py`, as a PyTorch user would write it.

    Q, K and V share one projection, and so do SwiGLU's gate and up: two wide matmuls beat
    five narrow ones and hold exactly the same parameters. Attention is SDPA with native GQA
    (query head h reads kv head h // (H / K), the framework's grouping).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    H, K, Dh, D, Fh = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim, c.mlp_dim

    def rope(x, cos, sin):
        # Split-half pairs (i, i + Dh/2), as rope.apply_rope rotates them.
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm = nn.RMSNorm(D, eps=c.norm_eps)
            self.qkv = nn.Linear(D, (H + 2 * K) * Dh, bias=False)
            self.out = nn.Linear(H * Dh, D, bias=False)
            self.mlp_norm = nn.RMSNorm(D, eps=c.norm_eps)
            self.gate_up = nn.Linear(D, 2 * Fh, bias=False)
            self.down = nn.Linear(Fh, D, bias=False)

        def forward(self, x, cos, sin):
            B, L, _ = x.shape
            q, k, v = self.qkv(self.attention_norm(x)).split([H * Dh, K * Dh, K * Dh], dim=-1)
            q = rope(q.view(B, L, H, Dh).transpose(1, 2), cos, sin)
            k = rope(k.view(B, L, K, Dh).transpose(1, 2), cos, sin)
            v = v.view(B, L, K, Dh).transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      enable_gqa=True)
            x = x + self.out(attended.transpose(1, 2).reshape(B, L, H * Dh))
            gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(c.vocab_size, D)
            self.layers = nn.ModuleList(Block() for _ in range(c.num_layers))
            self.final_norm = nn.RMSNorm(D, eps=c.norm_eps)
            half = Dh // 2
            inv_freq = c.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
            angle = torch.arange(c.max_seq_len, dtype=torch.float32)[:, None] * inv_freq
            self.register_buffer("cos", angle.cos(), persistent=False)
            self.register_buffer("sin", angle.sin(), persistent=False)

        def forward(self, tokens):
            L = tokens.shape[1]
            cos, sin = self.cos[:L], self.sin[:L]
            x = self.embedding(tokens)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return F.linear(self.final_norm(x), self.embedding.weight)  # tied output

    return Transformer()


def load_framework_params(model, params: dict) -> None:
    """Copies the framework's initial parameters in, so both runs start from the same point."""
    import torch

    params = jax.tree.map(np.array, params)  # writable copies, as torch.from_numpy wants
    if "layers" in params:  # scanned: every layer parameter has a leading layers axis
        layers = params["layers"]
    else:  # scan_layers=False: layers_0, layers_1, ...
        layers = jax.tree.map(lambda *xs: np.stack(xs),
                              *(params[f"layers_{i}"] for i in range(len(model.layers))))
    attention, mlp = layers["attention"], layers["mlp"]

    def matrix(x: np.ndarray, fan_in_axes: int) -> torch.Tensor:
        # Framework kernels are (inputs..., outputs...); torch Linear weights (out, in).
        rows = math.prod(x.shape[:fan_in_axes])
        return torch.from_numpy(np.ascontiguousarray(x.reshape(rows, -1).T))

    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(params["embedding"]))
        model.final_norm.weight.copy_(torch.from_numpy(params["final_norm"]["scale"]))
        for i, block in enumerate(model.layers):
            block.attention_norm.weight.copy_(
                torch.from_numpy(layers["attention_norm"]["scale"][i]))
            block.mlp_norm.weight.copy_(torch.from_numpy(layers["mlp_norm"]["scale"][i]))
            block.qkv.weight.copy_(torch.cat([matrix(attention[name][i], 1)
                                              for name in ("query", "key", "value")]))
            block.out.weight.copy_(matrix(attention["out"][i], 2))
            block.gate_up.weight.copy_(torch.cat([matrix(mlp[name][i], 1)
                                                  for name in ("gate", "up")]))
            block.down.weight.copy_(matrix(mlp["down"][i], 1))


def warmup_cosine(optimizer_config) -> Any:
    """The experiment's schedule as a LambdaLR factor: linear warm-up from 0, cosine decay."""
    warmup, total = optimizer_config.warmup_steps, SCHEDULE_STEPS
    final = optimizer_config.final_lr_fraction

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(step - warmup, total - warmup) / (total - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def framework_logits(model_config: TransformerConfig, params: dict,
                     tokens: np.ndarray) -> np.ndarray:
    """Logits of the framework's model, for the equivalence check."""
    from scaling.models.transformer import Transformer

    return np.asarray(jax.jit(Transformer(model_config).apply)({"params": params}, tokens))


def bench_torch(framework: dict[str, Any]) -> dict[str, Any] | None:
    """Eager PyTorch on all cores: the same batches, windows and starting point; None when
    torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    torch.set_num_threads(os.cpu_count() or 1)
    config, c = framework["config"], framework["model_config"]
    opt = config.optimizer
    model = make_torch_model(c)
    load_framework_params(model, framework["init_params"])
    param_count = sum(p.numel() for p in model.parameters())

    probe = framework["chunks"][0]["tokens"][0, :4, :-1]
    with torch.no_grad():
        logits = model(torch.from_numpy(probe).long()).numpy()
    logits_diff = float(np.max(np.abs(
        logits - framework_logits(c, framework["init_params"], probe))))

    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": opt.weight_decay},
         {"params": vectors, "weight_decay": 0.0}],
        lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opt))

    def train_step(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
        optimizer.step()
        scheduler.step()
        return loss.detach()

    model.train()
    seconds, faults, losses = [], [], []
    for chunk in framework["chunks"]:
        tokens = torch.from_numpy(chunk["tokens"]).long()
        start, start_faults = time.perf_counter(), page_faults()
        losses += [train_step(batch) for batch in tokens]
        seconds.append(time.perf_counter() - start)
        faults.append(page_faults() - start_faults)
    return {"param_count": param_count, "init_logits_max_abs_diff": logits_diff,
            "losses": [float(loss) for loss in losses],
            "call_seconds": seconds[WARMUP_CALLS:], "call_page_faults": faults[WARMUP_CALLS:]}


def contenders_of(framework: dict[str, Any], pytorch: dict[str, Any] | None,
                  ceilings: dict[str, float]) -> list[Contender]:
    """Tokens/s of every timed window, with model FLOP/s as a fraction of each ceiling."""
    tokens_per_call = (framework["steps_per_call"] * framework["config"].batch_size
                       * framework["seq_len"])
    results = {"framework": framework, "pytorch": pytorch}
    contenders: list[Contender] = []
    for name, result in results.items():
        if result is None:
            continue
        contender = Contender(name, [tokens_per_call / s for s in result["call_seconds"]],
                              baseline=contenders[0] if contenders else None)
        model_flops = contender.median * framework["flops_per_token"]
        contender.extra = {"window_seconds": result["call_seconds"], "model_flops": model_flops,
                           "page_faults_per_step": (statistics.median(result["call_page_faults"])
                                                    / framework["steps_per_call"]),
                           "param_count": result["param_count"], "final_loss": result["losses"][-1],
                           **{f"fraction_of_{ceiling}_matmul": model_flops / flops
                              for ceiling, flops in ceilings.items()}}
        contenders.append(contender)
    return contenders


def agreement(framework: dict[str, Any], pytorch: dict[str, Any]) -> dict[str, float]:
    """How closely PyTorch's model tracks the framework's: logits at init, losses per step."""
    loss_diff = np.abs(np.subtract(framework["losses"], pytorch["losses"]))
    return {"init_logits_max_abs_diff": pytorch["init_logits_max_abs_diff"],
            "first_chunk_loss_max_abs_diff": float(loss_diff[:framework["steps_per_call"]].max()),
            "all_steps_loss_max_abs_diff": float(loss_diff.max())}


def report(contenders: list[Contender], details: dict[str, Any]) -> list[Check]:
    ceilings = details["matmul_flops"]
    print(f"matmul ceiling ({MATMUL_SIZE}^3 float32): "
          + ", ".join(f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in ceilings.items()))
    if "all_steps_loss_max_abs_diff" in details:
        print(f"init logits max |diff| {details['init_logits_max_abs_diff']:.2e}; loss max |diff| "
              f"first chunk {details['first_chunk_loss_max_abs_diff']:.2e}, all steps "
              f"{details['all_steps_loss_max_abs_diff']:.2e}")
    print(f"{details['tokens_per_step']} tokens/step (batch {details['batch_size']} x seq "
          f"{details['seq_len']}), {details['flops_per_token'] / 1e6:.3f} MFLOP/token; medians "
          f"of {details['timed_calls']} windows of {details['steps_per_call']} steps after "
          f"{details['warmup_calls']} warm-up windows")
    print(f"{'name':<10} {'params':>8} {'tokens/s':>9} {'GFLOP/s':>8} "
          + " ".join(f"{f'of {name} mm':>11}" for name in ceilings)
          + f" {'faults/step':>11} {'final loss':>10}  windows (s)")
    for c in contenders:
        windows = " ".join(f"{s:.3f}" for s in c.extra["window_seconds"])
        print(f"{c.name:<10} {c.extra['param_count']:>8,} {c.median:>9,.0f} "
              f"{c.extra['model_flops'] / 1e9:>8.1f} "
              + " ".join(f"{c.extra[f'fraction_of_{name}_matmul']:>11.1%}" for name in ceilings)
              + f" {c.extra['page_faults_per_step']:>11,.0f} {c.extra['final_loss']:>10.4f}"
              f"  {windows}")
    if len(contenders) < 2:
        return []
    check = Check("framework / pytorch tokens/s", 1 / contenders[1].ratio,
                  at_least=TARGET_RATIO)
    print(check.line())
    return [check]


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50,
                        help="timed steps per contender, in whole calls of steps_per_call")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    start = cpu_seconds()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
          f"experiment {EXPERIMENT}", flush=True)
    ceilings = matmul_ceilings()
    framework = bench_framework(args.steps)
    pytorch = bench_torch(framework)
    if pytorch is None:
        print("pytorch: skipped (torch is not installed)")
    config = framework["config"]
    details = {
        "batch_size": config.batch_size, "seq_len": framework["seq_len"],
        "steps_per_call": framework["steps_per_call"],
        "tokens_per_step": config.batch_size * framework["seq_len"],
        "timed_calls": len(framework["call_seconds"]), "warmup_calls": WARMUP_CALLS,
        "flops_per_token": framework["flops_per_token"], "matmul_size": MATMUL_SIZE,
        "matmul_flops": ceilings,
        "framework_compile_call_seconds": framework["compile_call_seconds"],
        **(agreement(framework, pytorch) if pytorch else {}),
    }
    contenders = contenders_of(framework, pytorch, ceilings)
    checks = report(contenders, details)
    share = print_load(start)
    if args.json:
        write_results(args.json, "lm_tokens", "tokens per second", higher_is_better=True,
                      contenders=contenders, others_cpu_share=share, checks=checks,
                      details=details)


if __name__ == "__main__":
    sys.exit(main())
