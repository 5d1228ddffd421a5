"""What int8 weights and an int8 KV cache cost a served language model, and what they save.

One model (a Hugging Face directory, `--model=DIR`, or a training or import workdir,
`--workdir=DIR`) is loaded once and served by the engine four ways: float weights and cache
(the reference), `--quantize=int8`, `--kv_cache_dtype=int8`, and both. For each:

- greedy agreement with the reference: `--prompts` prompts of `--prompt_len` tokens, cut at
  random places from the held-out text, each continued greedily for `--new_tokens` tokens;
  the share of positions whose token equals the reference's (once a token differs the two
  continue from different texts, so this counts the drift a client sees), and the share of
  prompts whose whole continuation is identical;
- next-token agreement: the share of the reference's continuation tokens that the variant
  picks greedily given the reference's text before each (its prompt logprobs over prompt
  and continuation, computed through the variant's KV cache too): every choice on the same
  context, so a single early flip counts once;
- held-out perplexity: non-overlapping windows of the model's context from the held-out text,
  through the whole-sequence forward pass with the same params (the KV cache plays no part,
  so the int8-cache rows repeat the float ones);
- the bytes of the weights and of the KV cache the engine holds;
- decode tokens/s at batch 1 and 16: one, then sixteen concurrent greedy requests of
  `--new_tokens` tokens, median of `--repeats` runs after one untimed run (every program
  is compiled at the engine's warm-up, as a server compiles them). On a CPU int8 weights
  are not expected to save time, only memory (`scaling.models.quantized`).

The held-out text defaults to the last tenth of tiny Shakespeare, the part TFDS calls
validation and test, which `shakespeare_char_lm` never trains on.

    python bench/quantized_quality.py --model=tests/fixtures/hf/llama31 --max_model_len=128
    python bench/quantized_quality.py --workdir=/tmp/shakespeare [--json=PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO.parent / "shared" / "datasets" / "tiny_shakespeare" / "input.txt"
VARIANTS = {  # name: (quantize, kv_cache_dtype)
    "float": ("none", "auto"),
    "int8 weights": ("int8", "auto"),
    "int8 KV cache": ("none", "int8"),
    "int8 both": ("int8", "int8"),
}


@dataclasses.dataclass
class Loaded:
    model: object
    params: object
    mesh: object
    rules: tuple
    tokenizer: object
    name: str


def load(args) -> Loaded:
    """The model with its params on its mesh, and its tokenizer, as the server loads them."""
    from scaling.inference import hf_model
    from scaling.serving import lm_main

    if args.model:
        config = lm_main.hf_directory_config(Path(args.model), [], args.dtype,
                                             args.max_model_len)
        loaded = hf_model.load(Path(args.model), config)
        return Loaded(loaded.model, loaded.params, loaded.mesh, loaded.rules,
                      hf_model.load_tokenizer(config), str(args.model))
    from scaling.config import experiments as config_lib
    from scaling.data import workdir_tokenizer
    from scaling.inference import restore
    from scaling.models import lora

    workdir = Path(args.workdir)
    config, module = config_lib.load_recorded_config(workdir, args.experiment, [])
    restored = restore.load(config, workdir, experiment=module)
    params, c = restored.params, restored.model.config
    if c.lora_rank:
        params = lora.merged(params, c.lora_rank, c.lora_alpha)
    return Loaded(restored.model, params, restored.mesh, restored.rules,
                  workdir_tokenizer(config, workdir), config.experiment)


def heldout_tokens(args, tokenizer) -> np.ndarray:
    text = Path(args.heldout).read_text()
    return np.asarray(tokenizer.encode(text[int(len(text) * args.heldout_start):]), np.int32)


def make_prompts(tokens: np.ndarray, args, bos: int | None) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(tokens) - args.prompt_len, args.prompts)
    head = [] if bos is None else [bos]
    return [head + tokens[s:s + args.prompt_len].tolist() for s in starts]


def greedy(engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Every prompt's greedy continuation, all submitted at once; and the seconds taken."""
    from scaling import engine as engine_lib

    outputs = [[] for _ in prompts]
    left = [len(prompts)]
    done = threading.Event()
    lock = threading.Lock()

    def collector(i):
        def on_event(event):
            outputs[i].extend(event.token_ids)
            if event.finish_reason:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return on_event

    params = engine_lib.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.submit_many([engine_lib.Request(f"r{i}", prompt, params, collector(i))
                        for i, prompt in enumerate(prompts)])
    if not done.wait(1800):
        raise RuntimeError("requests did not finish in 30 minutes")
    return outputs, time.perf_counter() - start


def next_token_agreement(engine, prompts: list[list[int]],
                         reference: list[list[int]]) -> float:
    """The share of the reference's continuation tokens that this engine also picks greedily
    when given the reference's text up to each (from its prompt logprobs): each choice on the
    same context, so one early difference does not carry into the rest."""
    from scaling import engine as engine_lib

    logprobs, finished, done, lock = {}, [0], threading.Event(), threading.Lock()

    def collector(i):
        def on_event(event):
            if event.prompt_logprobs:
                logprobs[i] = event.prompt_logprobs
            if event.finish_reason:
                with lock:
                    finished[0] += 1
                    if finished[0] == len(prompts):
                        done.set()
        return on_event

    params = engine_lib.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                       prompt_logprobs=1)
    texts = [prompt + output for prompt, output in zip(prompts, reference, strict=True)]
    engine.submit_many([engine_lib.Request(f"t{i}", text, params, collector(i))
                        for i, text in enumerate(texts)])
    if not done.wait(1800):
        raise RuntimeError("prompt logprobs did not arrive in 30 minutes")
    same = [logprobs[i][position].top[0][0] == text[position]
            for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True))
            for position in range(len(prompt), len(text))]
    return float(np.mean(same))


def perplexity(model, params, tokens: np.ndarray, windows: int) -> float:
    """exp of the mean next-token loss over non-overlapping context-long windows."""
    L = model.config.max_seq_len
    count = min(windows, (len(tokens) - 1) // L)
    inputs = np.stack([tokens[i * L:(i + 1) * L] for i in range(count)])
    targets = np.stack([tokens[i * L + 1:(i + 1) * L + 1] for i in range(count)])

    @jax.jit
    def loss(params, inputs_BL, targets_BL):
        logits_BLV = model.apply({"params": params}, inputs_BL).astype(jnp.float32)
        logprobs_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
        return -jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1).sum()

    total = sum(float(loss(params, inputs[i:i + 8], targets[i:i + 8]))
                for i in range(0, count, 8))
    return math.exp(total / targets.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model directory")
    source.add_argument("--workdir", help="a training or import workdir")
    parser.add_argument("--experiment", help="--workdir: the experiment file, if moved")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="--model: the weights' dtype")
    parser.add_argument("--max_model_len", type=int, help="--model: the context served")
    parser.add_argument("--heldout", default=str(HELDOUT), help="held-out text file")
    parser.add_argument("--heldout_start", type=float, default=0.9,
                        help="where in the file the held-out text starts (a fraction)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--ppl_windows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()

    from scaling import engine as engine_lib
    from scaling.engine import quantize
    from scaling.models.transformer import unrolled

    loaded = load(args)
    tokens = heldout_tokens(args, loaded.tokenizer)
    prompts = make_prompts(tokens, args, loaded.tokenizer.bos_id)
    context = loaded.model.config.max_seq_len
    if len(prompts[0]) + args.new_tokens > context:
        sys.exit(f"prompts of {len(prompts[0])} and {args.new_tokens} new tokens exceed the "
                 f"context {context}; lower --prompt_len or raise --max_model_len")
    print(f"{loaded.name}: {args.prompts} prompts of {len(prompts[0])} tokens, "
          f"{args.new_tokens} new tokens each; held-out {len(tokens):,} tokens of "
          f"{args.heldout}; {jax.devices()[0].platform}", flush=True)

    serving, float_params = unrolled(engine_lib.serving_model(loaded.model), loaded.params)
    loaded_bytes = quantize.weight_bytes(float_params)
    rows, reference, perplexities = [], None, {}
    for name, (method, kv_dtype) in VARIANTS.items():
        options = engine_lib.EngineOptions(max_num_seqs=16, kv_block_size=16,
                                           prefill_chunk=min(512, context),
                                           quantize=method, kv_cache_dtype=kv_dtype)
        engine = engine_lib.make_engine(loaded.model, loaded.params, loaded.mesh, loaded.rules,
                                        loaded.tokenizer, options)
        engine.start()
        try:
            outputs, _ = greedy(engine, prompts, args.new_tokens)
            stepwise = next_token_agreement(engine, prompts, reference or outputs)
            speeds = {}
            for batch in (1, 16):
                greedy(engine, prompts[:batch], args.new_tokens)  # every shape compiled
                times = [greedy(engine, prompts[:batch], args.new_tokens)[1]
                         for _ in range(args.repeats)]
                speeds[batch] = batch * args.new_tokens / statistics.median(times)
        finally:
            engine.stop()
        if reference is None:
            reference = outputs
        same = np.asarray(outputs) == np.asarray(reference)
        if method not in perplexities:
            perplexities[method] = perplexity(serving, engine.programs.params, tokens,
                                              args.ppl_windows)
        rows.append({"variant": name, "agreement": float(same.mean()),
                     "next_token_agreement": stepwise,
                     "identical_prompts": float(same.all(axis=1).mean()),
                     "perplexity": perplexities[method],
                     "weight_bytes": engine.programs.weight_bytes,
                     "weight_ratio": engine.programs.weight_bytes / loaded_bytes,
                     "cache_bytes": engine.programs.cache_bytes,
                     "tokens_per_s_batch_1": speeds[1], "tokens_per_s_batch_16": speeds[16]})
        print(json.dumps(rows[-1]), flush=True)

    base = rows[0]
    print("\n| variant | greedy agreement | identical continuations | next-token agreement "
          "| held-out perplexity | weight bytes | KV cache bytes | decode tok/s, batch 1 "
          "| batch 16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        change = row["perplexity"] / base["perplexity"] - 1
        print(f"| {row['variant']} | {row['agreement']:.1%} | {row['identical_prompts']:.0%} | "
              f"{row['next_token_agreement']:.1%} | "
              f"{row['perplexity']:.3f} ({change:+.2%}) | {row['weight_bytes']:,} "
              f"({row['weight_ratio']:.3f}x) | {row['cache_bytes']:,} "
              f"({row['cache_bytes'] / base['cache_bytes']:.2f}x) | "
              f"{row['tokens_per_s_batch_1']:.0f} | {row['tokens_per_s_batch_16']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": loaded.name, "args": vars(args),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
