"""Language-model serving: the engine behind its HTTP server, `--mode=sample`, and transformers.

One random Llama (8 layers, 512 wide, 8 heads of 64, SwiGLU 1536, vocabulary 8,192, context
512, float32) is written as a Hugging Face checkpoint with torch, imported with
`--mode=import_hf`, and then:

(a) greedy decoding of 32-token prompts, 128 new tokens, at batch 1 and 16: transformers'
    `generate` against `scaling.inference.sample.generate` (what `--mode=sample` runs), tokens
    compared; tokens/s, medians of `--repeats` runs after a warm-up;
(b) `python -m scaling.serve` on loopback with `--max_num_seqs=64`, driven by a bounded load
    generator (each of `concurrency` workers sends its next streaming request when the last
    one ends) at concurrency 1, 4, 16 and 64: output tokens/s, time to first token and
    inter-token latency p50/p99, against (a)'s one-request-at-a-time sample path;
(c) the KV cache the server held at most for the 64 concurrent requests, against a dense
    cache of the whole context for each of 64 slots.

The bounds are measured in the same run: this machine's memory bandwidth (a jitted read of a
256 MiB array) and its float32 matmul peak (`matmul_ceiling.py`'s product). Each decode step
size of (a) is reported as bytes read ÷ time against the bandwidth and FLOPs ÷ time against
the peak: batch 1 reads every weight for one token and is bound by memory, batch 16 does 16
rows of work on each weight read and moves toward the compute bound. At each concurrency of
(b) the engine's own figures (`/metrics`) give the host time per decode step (building the
step, reading its tokens, stop checks, text, events) beside the time the host waited for the
device; with steps overlapped, the device time per step is about their sum, and the
`--mode=sample` step at the same batch (no host in its loop) is printed beside them.

    python bench/serve_lm.py [--json=PATH]

torch and transformers are bench-only dependencies; without them the script stops with a note.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine_load import cpu_seconds, print_load
from results import Check, Contender, write_results

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, head_dim=64,
             max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
PROMPT_LEN, NEW_TOKENS = 32, 128
EXPERIMENT = '''"""The serving benchmark's random Llama."""
import ml_collections

def get_config():
    return ml_collections.ConfigDict({{
        "task": "language_modeling",
        "data": {{"name": "tiny_shakespeare", "tokenizer": "huggingface",
                 "tokenizer_model": "{tokenizer}",
                 "seq_len": 64}},
        "model": {{"name": "transformer", "max_seq_len": 512, **{model}}},
        "optimizer": {{"name": "adam", "learning_rate": 1e-3}},
        "batch_size": 8, "num_steps": 1,
    }})
'''


def write_checkpoint(directory: Path) -> None:
    """A random Llama and a word-level tokenizer over its vocabulary, as the Hub has them."""
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, SHAPE["vocab_size"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))


def import_workdir(source: Path, root: Path) -> tuple[Path, Path]:
    from scaling.interop import hf_config

    fields = hf_config.model_fields(hf_config.read(source), source / "config.json")
    experiment = root / "bench_llama.py"
    experiment.write_text(EXPERIMENT.format(tokenizer=source / "tokenizer.json",
                                            model=repr(fields)))
    workdir = root / "imported"
    subprocess.run([sys.executable, "-m", "scaling.main", f"--experiment={experiment}",
                    "--mode=import_hf", f"--source={source}", f"--workdir={workdir}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return experiment, workdir


def prepared_model(prefix: str) -> tuple[Path, Path, Path]:
    """The bench's random Llama, written as a Hugging Face directory and imported into a
    workdir under a new temporary folder: (the directory, the experiment file, the workdir).
    transformers writes the checkpoint, so the bench stops here without it."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("note: torch and transformers are not installed; pip install them "
                         "to run this benchmark") from None
    root = Path(tempfile.mkdtemp(prefix=prefix))
    source = root / "hf"
    write_checkpoint(source)
    return (source, *import_workdir(source, root))


def memory_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes/s of a jitted sum over a float32 array far larger than the caches (median)."""
    import jax
    import jax.numpy as jnp

    array = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    read = jax.jit(jnp.sum)
    read(array).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        read(array).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return array.nbytes / float(np.median(seconds))


def matmul_peak() -> float:
    """FLOP/s of a large float32 matmul through XLA (median): the compute bound."""
    from matmul_ceiling import xla_matmul_flops

    return float(np.median(xla_matmul_flops(repeats=5)))


def decode_step_cost(batch: int, context: int) -> tuple[float, float]:
    """Bytes read and FLOPs of one decode step of `batch` rows at `context` positions:
    every layer's weights and the output projection once, each row's keys and values."""
    d, f, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    heads, kv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    hd, V = SHAPE["head_dim"], SHAPE["vocab_size"]
    weights = L * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + d * V
    kv_bytes = batch * L * 2 * context * kv * hd * 4
    attention = batch * L * 4 * context * heads * hd
    return weights * 4 + kv_bytes, batch * 2 * weights + attention


def timed(function, repeats: int) -> tuple[list[float], object]:
    """Seconds of each call after one warm-up call, and the last result."""
    result = function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        samples.append(time.perf_counter() - start)
    return samples, result


def transformers_generate(source: Path, prompts: np.ndarray, repeats: int):
    import torch
    import transformers

    torch.set_num_threads(2)
    model = transformers.LlamaForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    model.eval()
    ids = torch.as_tensor(prompts)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return timed(run, repeats)


def sample_generate(experiment: Path, workdir: Path, prompts: np.ndarray, repeats: int):
    import jax.numpy as jnp

    from scaling.config import experiments as config_lib
    from scaling.inference import restore, sample

    config, module = config_lib.load_recorded_config(workdir, str(experiment), [])
    restored = restore.load(config, workdir, experiment=module)

    def run():
        out = sample.generate(restored.model, restored.params, jnp.asarray(prompts),
                              jnp.asarray(0, jnp.uint32), jnp.asarray(0), num_new=NEW_TOKENS,
                              temperature=0.0, top_k=0, vocab_limit=SHAPE["vocab_size"])
        return np.asarray(out)

    return timed(run, repeats)


class Server:
    def __init__(self, experiment: Path, workdir: Path, log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scaling.serve", f"--workdir={workdir}",
             f"--experiment={experiment}", "--port=0", "--max_num_seqs=64",
             "--max_queue=4096"], stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=REPO)
        for line in self.process.stdout:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise SystemExit(f"the server exited; see {log}")

    def stream(self, prompt: list[int]) -> list[float]:
        """Arrival times of each token of one greedy streaming completion, from its send."""
        body = json.dumps({"model": "bench_llama", "prompt": prompt, "max_tokens": NEW_TOKENS,
                           "temperature": 0, "stream": True, "ignore_eos": True,
                           # the random model may draw <s> or </s>, whose text would be
                           # skipped and their events with it: every token keeps its event
                           "skip_special_tokens": False})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"the server answered {response.status}: {response.read()!r}")
        times = []
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter() - start)  # one event per token
        connection.close()
        return times

    def step_times(self) -> tuple[float, float, float]:
        """The engine's decode steps so far, its host seconds in them and its waits."""
        return (self.metric("decode_steps_total"), self.metric("decode_host_seconds_total"),
                self.metric("decode_wait_seconds_total"))

    def metric(self, name: str) -> float:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        return float(re.search(rf"^\S*{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()


def drive(server: Server, prompts: np.ndarray, concurrency: int,
          per_worker: int) -> tuple[list[list[float]], float]:
    """`concurrency` workers, each sending `per_worker` requests one after another: each
    request's token arrival times from its send, and the wall time of the whole load."""
    results, lock = [], threading.Lock()

    def worker(w):
        for i in range(per_worker):
            times = server.stream(prompts[(w * per_worker + i) % len(prompts)].tolist())
            with lock:
                results.append(times)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def load(server: Server, prompts: np.ndarray, concurrency: int, per_worker: int) -> dict:
    """Output tokens/s of `drive`, time to first token and the gaps between tokens."""
    results, wall = drive(server, prompts, concurrency, per_worker)
    tokens = sum(len(t) for t in results)
    ttft = [t[0] for t in results]
    itl = [b - a for t in results for a, b in zip(t, t[1:], strict=False)]
    return {"concurrency": concurrency, "requests": len(results), "tokens_per_s": tokens / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.percentile(itl, 50)), "itl_p99": float(np.percentile(itl, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = cpu_seconds()
    source, experiment, workdir = prepared_model("serve_lm_")
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, SHAPE["vocab_size"], (64, PROMPT_LEN)).astype(np.int64)

    contenders, checks, details = [], [], {}
    bandwidth, peak = memory_bandwidth(), matmul_peak()
    print(f"bounds: memory bandwidth {bandwidth / 1e9:.1f} GB/s (a 256 MiB read), float32 "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3)")
    details["bounds"] = {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": peak}
    print(f"(a) greedy, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, tokens/s "
          f"(median of {args.repeats})")
    sample_tps = {}
    for batch in (1, 16):
        hf_seconds, hf_tokens = transformers_generate(source, prompts[:batch], args.repeats)
        ours_seconds, our_tokens = sample_generate(experiment, workdir,
                                                   prompts[:batch].astype(np.int32),
                                                   args.repeats)
        same = bool(np.array_equal(hf_tokens, our_tokens))
        hf = Contender(f"transformers generate, batch {batch}",
                       [batch * NEW_TOKENS / s for s in hf_seconds])
        ours = Contender(f"--mode=sample, batch {batch}",
                         [batch * NEW_TOKENS / s for s in ours_seconds], baseline=hf,
                         extra={"tokens_equal": same})
        contenders += [hf, ours]
        sample_tps[batch] = ours.median
        print(f"  batch {batch:2d}: transformers {hf.median:7.1f}  --mode=sample "
              f"{ours.median:7.1f} ({ours.ratio:.2f}x)  tokens identical: {same}")
        checks.append(Check(f"--mode=sample / transformers, batch {batch}", ours.ratio,
                            at_least=1.5))
        step = batch / ours.median  # seconds per decode step
        nbytes, flops = decode_step_cost(batch, PROMPT_LEN + NEW_TOKENS // 2)
        print(f"    a step of {batch} rows: {step * 1e3:.2f} ms, {nbytes / step / 1e9:.1f} GB/s "
              f"({nbytes / step / bandwidth:.0%} of the bandwidth), {flops / step / 1e9:.1f} "
              f"GFLOP/s ({flops / step / peak:.0%} of the matmul peak)")
        details[f"sample_step_batch_{batch}"] = {"seconds": step, "bytes": nbytes,
                                                 "flops": flops}
        if batch == 1:
            checks.append(Check("batch-1 decode bytes/s / memory bandwidth",
                                nbytes / step / bandwidth, at_least=0.85))

    print("(b) the server, streaming greedy completions over loopback")
    server = Server(experiment, workdir, source.parent / "serve.log")
    try:
        rows = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            server.stream(prompts[0].tolist())  # the first request after a pause is not timed
            before = server.step_times()
            row = load(server, prompts, concurrency, per_worker=max(2, 16 // concurrency))
            steps, host, wait = (b - a for a, b in zip(before, server.step_times(),
                                                       strict=True))
            row |= {"host_ms_per_step": host / steps * 1e3,
                    "wait_ms_per_step": wait / steps * 1e3}
            rows.append(row)
            device = (f"{1e3 * concurrency / sample_tps[concurrency]:5.2f}"
                      if concurrency in sample_tps else "    -")
            print(f"  concurrency {concurrency:2d}: {row['tokens_per_s']:7.1f} tokens/s  "
                  f"ttft p50/p99 {row['ttft_p50'] * 1e3:6.0f}/{row['ttft_p99'] * 1e3:6.0f} ms  "
                  f"itl p50/p99 {row['itl_p50'] * 1e3:5.1f}/{row['itl_p99'] * 1e3:5.1f} ms  "
                  f"per step: host {row['host_ms_per_step']:5.2f} ms, waited for the device "
                  f"{row['wait_ms_per_step']:5.2f} ms, --mode=sample step {device} ms")
        peak_blocks = server.metric("kv_blocks_peak")
        block_bytes = server.metric("kv_block_bytes")
    finally:
        server.stop()
    details["server"] = rows
    by_concurrency = {row["concurrency"]: row for row in rows}
    if 16 in by_concurrency:
        checks.append(Check("server tokens/s at concurrency 16 / --mode=sample batch 16",
                            by_concurrency[16]["tokens_per_s"] / sample_tps[16], at_least=0.9))
        checks.append(Check("time to first token p99 at concurrency 16, seconds",
                            by_concurrency[16]["ttft_p99"], at_most=0.5))
    if 1 in by_concurrency:
        sample_step = 1 / sample_tps[1]
        checks.append(Check("single-stream inter-token latency / --mode=sample time per token",
                            by_concurrency[1]["itl_p50"] / sample_step, at_most=1.1))

    dense = 64 * 2 * SHAPE["num_hidden_layers"] * SHAPE["max_position_embeddings"] * (
        SHAPE["num_key_value_heads"] * SHAPE["head_dim"] * 4)
    paged = peak_blocks * block_bytes
    print(f"(c) KV cache for 64 concurrent {PROMPT_LEN}+{NEW_TOKENS}-token requests: paged "
          f"{paged / 2**20:.0f} MiB at most ({peak_blocks:.0f} blocks), dense per slot "
          f"{dense / 2**20:.0f} MiB ({paged / dense:.2f}x)")
    checks.append(Check("paged cache held / dense per-slot cache", paged / dense, at_most=0.25))
    details["kv_cache"] = {"paged_peak_bytes": paged, "dense_bytes": dense}
    for check in checks:
        print(check.line())
    share = print_load(machine)
    if args.json:
        write_results(args.json, "serve_lm", "tokens/s", higher_is_better=True,
                      contenders=contenders, others_cpu_share=share, checks=checks,
                      details=details)


if __name__ == "__main__":
    main()
