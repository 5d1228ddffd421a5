"""Training throughput and MFU of a 0.8B bfloat16 LM on one NVIDIA GPU, by attention form.

Runs the framework's real compiled step (`Run.train_steps`, built by `build_run_from_shapes`
from `experiments/lm_1b.py` with the model narrowed to 0.8B parameters) on synthetic tokens,
which cost the step the same as real ones:

    python bench/gpu_lm.py [--json=PATH] [--steps=N] [--variants=NAME,...]

First it checks the cuDNN kernel against float32 einsum attention on the GPU (forward and
gradients; causal and packed documents, with queries in order and reordered as context
parallelism has them) and counts its custom calls in the compiled program.
Then each variant trains `steps` steps after two warm-up calls; the figure is the median
seconds a step. Tokens/s, and MFU against the chip's dense bfloat16 peak from
`scaling.runtime.chips` (989 TFLOP/s for an H200), follow from `flops_per_token` (PaLM
convention, the causal half of attention counted as done). Each variant's peak memory comes
from XLA's compiled memory analysis before it runs, so one that cannot fit is reported, not
crashed into.

`--size=tiny --variants=einsum_tiled` runs the same code on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import scaling.config.experiments
from scaling.data import element_spec
from scaling.models import context, gpu_attention
from scaling.models.attention import causal_mask, grouped_einsum_attention, segment_mask
from scaling.models.transformer_formulas import flops_per_token
from scaling.runtime import chips
from scaling.sharding import mesh as mesh_lib
from scaling.training.run import build_run_from_shapes, lower_train_step

SIZES = {  # model overrides of experiments/lm_1b.py, and (batch, seq_len)
    "0.8b": ({"num_layers": 16, "embed_dim": 2048, "num_heads": 16, "num_kv_heads": 8,
              "head_dim": 128, "mlp_dim": 5632, "vocab_size": 32768}, (16, 2048)),
    "tiny": ({"num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 16, "mlp_dim": 128, "vocab_size": 256}, (4, 128)),
}
# name: (attention, loss_chunk, packing, remat_policy, batch divisor)
VARIANTS = {
    "cudnn_tiled": ("cudnn", 512, "concat", "none", 1),
    "cudnn_tiled_documents": ("cudnn", 512, "documents", "none", 1),
    "cudnn_dense_loss": ("cudnn", 0, "concat", "none", 1),
    "einsum_tiled": ("grouped_einsum", 512, "concat", "none", 1),
    "einsum_tiled_half_batch": ("grouped_einsum", 512, "concat", "none", 2),
    "cudnn_tiled_half_batch": ("cudnn", 512, "concat", "none", 2),
    "einsum_tiled_quarter_batch": ("grouped_einsum", 512, "concat", "none", 4),
    "cudnn_tiled_quarter_batch": ("cudnn", 512, "concat", "none", 4),
    "einsum_tiled_remat": ("grouped_einsum", 512, "concat", "dots_with_no_batch_dims", 1),
    "cudnn_tiled_remat": ("cudnn", 512, "concat", "dots_with_no_batch_dims", 1),
}
MEMORY_HEADROOM = 0.9  # run a variant only if its compiled peak fits in this share of HBM


def check_cudnn_kernel() -> dict:
    """cuDNN attention and the written form, both bfloat16, against float32 einsum attention.

    The fused kernel must be no further from the float32 truth than the bfloat16 einsum is
    (within 2x), forward and gradients, and its custom calls must be in the compiled program.
    """
    B, L, H, K, Dh = 2, 1024, 16, 8, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, L, H, Dh), jnp.float32)
    k = jax.random.normal(keys[1], (B, L, K, Dh), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, K, Dh), jnp.float32)
    cot = jax.random.normal(keys[3], (B, L, H, Dh), jnp.float32)
    ids = np.zeros((B, L), np.int32)
    ids[0, :300], ids[0, 300:900] = 1, 2
    ids[1, :700], ids[1, 700:1000] = 1, 2
    ids = jnp.asarray(ids)
    order = jnp.asarray(context.balanced_order(L, 2))  # queries as context parallelism has them
    cases = {"causal": (None, None, None), "documents": (ids, ids, None),
             "reordered": (None, None, order), "reordered documents": (ids[:, order], ids, order)}
    report = {}
    for name, (q_ids, kv_ids, q_slot) in cases.items():
        if q_ids is None:
            mask = causal_mask(jnp.arange(L) if q_slot is None else q_slot, L)
        else:
            mask = segment_mask(q_ids, kv_ids, q_slot)

        def forms(q_ids=q_ids, kv_ids=kv_ids, q_slot=q_slot, mask=mask):
            return {
                "cudnn": lambda q, k, v: gpu_attention.cudnn_attention(q, k, v, q_ids, kv_ids,
                                                                       q_slot),
                "einsum": lambda q, k, v: grouped_einsum_attention(q, k, v, mask),
            }

        def value_and_grads(fn, dtype):
            def loss(*qkv):
                return jnp.sum(fn(*qkv).astype(jnp.float32) * cot)

            args = [x.astype(dtype) for x in (q, k, v)]
            out = jax.jit(fn)(*args).astype(jnp.float32)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
            return [out] + [g.astype(jnp.float32) for g in grads]

        truth = value_and_grads(forms()["einsum"], jnp.float32)
        errors = {}
        for form, fn in forms().items():
            got = value_and_grads(fn, jnp.bfloat16)
            errors[form] = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                            for a, b in zip(got, truth, strict=True)]
        hlo = jax.jit(jax.grad(lambda *a: jnp.sum(forms()["cudnn"](*a).astype(jnp.float32)),
                               argnums=(0, 1, 2))).lower(
            *[x.astype(jnp.bfloat16) for x in (q, k, v)]).compile().as_text()
        calls = hlo.count('custom_call_target="__cudnn$fmha')
        within = all(c <= 2 * e + 1e-3 for c, e in zip(errors["cudnn"], errors["einsum"],
                                                           strict=True))
        report[name] = {"relative_error_out_dq_dk_dv": errors, "cudnn_custom_calls": calls,
                        "cudnn_within_2x_of_bf16_einsum": within}
        shown = {form: ", ".join(f"{e:.2e}" for e in errs) for form, errs in errors.items()}
        print(f"kernel check {name}: cudnn error [{shown['cudnn']}], "
              f"bf16 einsum [{shown['einsum']}], "
              f"{calls} cuDNN custom calls, {'ok' if within else 'WORSE'}", flush=True)
    return report


def synthetic_chunk(spec: dict, batch: int, rng: np.random.Generator, vocab: int) -> dict:
    """One step's batch of random tokens; with segment ids, documents of 64-1024 tokens."""
    length = next(iter(spec.values())).shape[0]
    chunk = {"tokens": rng.integers(0, vocab, (1, batch, length), dtype=np.int32)}
    if "segment_ids" in spec:
        ids = np.zeros((batch, length), np.int32)
        positions = np.zeros((batch, length), np.int32)
        for row in range(batch):
            start, doc = 0, 1
            while start < length:
                end = min(length, start + int(rng.integers(64, 1025)))
                ids[row, start:end] = doc
                positions[row, start:end] = np.arange(end - start)
                start, doc = end, doc + 1
        chunk["segment_ids"], chunk["positions"] = ids[None], positions[None]
    return chunk


def bench_variant(name: str, size: str, steps: int) -> dict:
    attention, loss_chunk, packing, remat, divisor = VARIANTS[name]
    model, (batch, seq_len) = SIZES[size]
    batch //= divisor
    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        f"model.attention={attention}", f"model.loss_chunk={min(loss_chunk, seq_len)}",
        f"model.remat_policy={remat}", f"model.max_seq_len={seq_len}",
        f"data.seq_len={seq_len}", f"data.packing={packing}", f"batch_size={batch}",
        f"eval_batch_size={batch}", "mesh.fsdp=1", "mesh.data=-1"]
    config, module = scaling.config.experiments.load_config("lm_1b", overrides)
    mesh = mesh_lib.make_mesh(config.mesh)
    run = build_run_from_shapes(config, mesh, module)
    started = time.perf_counter()
    compiled = lower_train_step(run).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    device = jax.devices()[0]
    capacity = (device.memory_stats() or {}).get("bytes_limit")
    result = {"variant": name, "attention": run.model.config.attention,
              "loss_chunk": run.model.config.loss_chunk, "packing": packing,
              "remat": remat, "batch": batch, "seq_len": seq_len,
              "compile_s": round(compile_s, 1), "compiled_peak_gib": peak / 2**30,
              "cudnn_custom_calls": compiled.as_text().count('custom_call_target="__cudnn$fmha')}
    if capacity and peak > MEMORY_HEADROOM * capacity:
        result["skipped"] = f"needs {peak / 2**30:.1f} GiB of {capacity / 2**30:.1f}"
        print(f"{name}: {result['skipped']}", flush=True)
        return result

    state = run.init()
    rng = np.random.default_rng(0)
    spec = element_spec(config)
    sharding = mesh_lib.batch_sharding(run.mesh, run.rules, leading_dims=1)
    chunks = [jax.device_put(synthetic_chunk(spec, batch, rng, config.model.vocab_size),
                             sharding) for _ in range(2)]
    seconds, losses = [], []
    for i in range(2 + steps):
        started = time.perf_counter()
        state, metrics = compiled(state, chunks[i % 2])
        loss = float(jax.device_get(metrics["loss"])[0])  # waits for the step
        seconds.append(time.perf_counter() - started)
        losses.append(loss)
    step_s = statistics.median(seconds[2:])
    tokens = batch * seq_len
    flops = flops_per_token(run.model.config, seq_len) * tokens
    chip = chips.chip_for(device.device_kind)
    result.update({
        "step_s_median": step_s, "step_s": seconds, "losses": losses,
        "tokens_per_s": tokens / step_s, "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / chip.peak_flops if chip else None,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
    })
    mfu = f"{result['mfu']:.1%}" if chip else "n/a"
    print(f"{name}: {step_s * 1e3:.1f} ms a step, {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['tflops_per_s']:.0f} TFLOP/s, MFU {mfu}, compiled peak {peak / 2**30:.1f} "
          f"GiB, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    del state, chunks
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.8b", choices=SIZES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform})", flush=True)
    results = {"device": device.device_kind, "jax": jax.__version__, "size": args.size,
               "variants": []}
    if device.platform == "gpu":
        results["kernel_check"] = check_cudnn_kernel()
    for name in args.variants.split(","):
        try:
            results["variants"].append(bench_variant(name, args.size, args.steps))
        except Exception as e:  # one variant's failure (memory, a kernel) keeps the others
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            results["variants"].append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
