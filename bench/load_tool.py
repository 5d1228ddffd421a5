"""The LM server under guidellm, a load generator the field uses, beside the project's own.

Serves `serve_lm.py`'s random Llama (8 layers, 512 wide, float32) with `python -m
scaling.serve` on loopback and, at each concurrency, drives it in turns with (a) the load
generator of `serve_lm.py` (each of `concurrency` threads sends its next streaming request
when the last one ends) and (b) guidellm's `concurrent` profile with as many streams: the same
number of requests, 32-token prompts, 128 new tokens each (`ignore_eos`, greedy), streamed.
Runs alternate, ours then guidellm's, `--repeats` times, so a change in the machine's load
falls on both; each run gets fresh random prompts, so neither finds the other's prompts in
the prefix cache. The table gives the medians of output tokens/s, time to first token and
inter-token latency p50/p99, and guidellm / ours for each.

Both sides measure the same things the same way, so that the ratio says something about the
server and not about definitions:
- time to first token: from sending the request to the first streamed token (guidellm
  starts its clock as it writes the headers on a kept-alive connection, ours before opening a
  new one: a loopback connect, well under a millisecond);
- inter-token latency: guidellm's, one value per request, (last token - first token) /
  (tokens - 1); ours is computed that way here too. `serve_lm.py`'s own figure is the spread
  of every gap between tokens, whose p99 is far higher; it is printed beside them;
- percentiles: guidellm's (the first value whose cumulative share reaches p, numpy's
  `inverted_cdf`), so p99 of 16 requests is the slowest one on both sides;
- output tokens/s: all output tokens over the time from the first request sent to the last
  one done (guidellm's `output_tokens_per_second` mean, which is that).

Why guidellm. The three OpenAI-compatible load tools the field uses are guidellm,
inference-perf and aiperf. Nothing can be downloaded here but packages, so the tool has to
count tokens without a model hub. guidellm takes a local tokenizer directory (here the served
checkpoint's own `tokenizer.json`), reads prompts from a JSON Lines file, and with
`prefer_response_metrics` (its default) counts tokens from the `usage` the server streams
(`stream_options.include_usage`). aiperf also counts from `usage`
(`--use-server-token-count`), but runs as a set of services in separate processes (system
controller, dataset and timing managers, workers, record processors over ZMQ), which on a
2-core machine take the cores from the server under test, and pulls in dash, plotly,
kubernetes and pandas. inference-perf's releases need Python >= 3.12.

What the two clients cost is printed too, because on a 2-core machine the client shares
the cores with the server it measures: the CPU that guidellm's processes used during its load
(sampled from /proc every half second) and that ours used (this process, whose only work then
is the client threads).

Prompts go to guidellm as text, `w<id>` words that the served word-level tokenizer maps back
to exactly the ids our generator sends, with `add_special_tokens: false` so the server adds no
begin-of-text token: both sides send the same 32 tokens.

guidellm is a bench-only dependency with its own pins (it needs torch and datasets), so it
lives in a virtualenv of its own and runs as a subprocess:

    python -m venv /work/venv-load && /work/venv-load/bin/pip install guidellm
    python bench/load_tool.py --tool_python=/work/venv-load/bin/python \\
        [--concurrency=1,4,16] [--repeats=3] [--json=PATH]

(pip resolves guidellm's torch to the CUDA build, several GB; installing a CPU torch wheel into
the virtualenv first keeps it small.) Every subprocess has a time limit and all traffic stays
on 127.0.0.1; the tool runs with the Hugging Face libraries offline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
from machine_load import cpu_seconds, others_share, print_load
from results import Check, Contender, write_results
from serve_lm import NEW_TOKENS, PROMPT_LEN, SHAPE, Server, drive, prepared_model

METRICS = ("tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
LABELS = {"tokens_per_s": "output tokens/s", "ttft_p50": "TTFT p50, ms",
          "ttft_p99": "TTFT p99, ms", "itl_p50": "ITL p50, ms", "itl_p99": "ITL p99, ms"}


def percentile(values: list[float], p: float) -> float:
    """guidellm's percentile: the first value whose cumulative share reaches p."""
    return float(np.percentile(values, p, method="inverted_cdf"))


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used so far (user and system, from /proc); 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by a process and all its live descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grown = {root}, True
    while grown:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grown = bool(found)
    return sum(process_cpu(pid) for pid in tree)


def run_ours(server: Server, prompts: np.ndarray, concurrency: int) -> dict:
    """One run of `serve_lm.py`'s load generator, with guidellm's definitions (above)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    results, wall = drive(server, prompts, concurrency, len(prompts) // concurrency)
    after = resource.getrusage(resource.RUSAGE_SELF)
    if len(results) != len(prompts):
        raise SystemExit(f"{len(prompts) - len(results)} of {len(prompts)} requests failed")
    if any(len(t) != NEW_TOKENS for t in results):
        raise SystemExit(f"a request streamed {min(map(len, results))} tokens, not {NEW_TOKENS}")
    ttft = [t[0] for t in results]
    itl = [(t[-1] - t[0]) / (len(t) - 1) for t in results]
    gaps = [b - a for t in results for a, b in zip(t, t[1:], strict=False)]
    client = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
    return {"tokens_per_s": sum(map(len, results)) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "gap_p50": float(np.percentile(gaps, 50)), "gap_p99": float(np.percentile(gaps, 99)),
            "client_cores": client, "seconds": wall}


def write_scenario(folder: Path, port: int, tokenizer: Path, prompts: np.ndarray,
                   concurrency: int, requests: int) -> Path:
    """guidellm's scenario for one run: its prompts file, the server, the profile, the output.

    The file holds more prompts than the run sends: guidellm stops at `max_requests`, while a
    file that runs out first can end the run before its last request is counted.

    A prompt row with `output_tokens_count` makes guidellm send `max_tokens` and
    `ignore_eos`; the body extras make decoding greedy as ours is, ask for the final usage
    only (guidellm asks for usage on every chunk by default, work our generator does not
    ask the server for), keep the server from adding a begin-of-text token, and keep the
    text of special tokens the random model may draw, so that every token has its event."""
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(f"w{t}" for t in row),
                                        "output_tokens_count": NEW_TOKENS}) + "\n"
                            for row in prompts))
    body = {"temperature": 0, "add_special_tokens": False, "skip_special_tokens": False,
            "stream_options": {"include_usage": True}}
    spec = {
        "backend": {"kind": "openai_http", "target": f"http://127.0.0.1:{port}",
                    "model": "bench_llama", "request_format": "/v1/completions",
                    "timeout": 600, "extras": {"body": body}},
        "profile": {"kind": "concurrent", "streams": concurrency},
        "constraints": [{"kind": "max_requests", "count": requests}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "json_file", "path": str(data)}],
        "outputs": [{"kind": "json", "path": str(folder / "report.json")}],
    }
    scenario = folder / "scenario.json"
    scenario.write_text(json.dumps({"spec": spec}, indent=1))
    return scenario


def run_tool(tool_python: str, scenario: Path, requests: int, timeout: float) -> dict:
    """One guidellm run of `scenario`, its own figures read from its JSON report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = scenario.parent / "guidellm.log"
    samples = []  # (time, CPU seconds of guidellm's processes): its own load on the machine
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([tool_python, "-m", "guidellm", "run", "-c", str(scenario),
                                    "--disable-console"], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=scenario.parent)
        try:
            while process.poll() is None:
                if time.perf_counter() - start > timeout:
                    process.kill()
                    process.wait()
                    raise SystemExit(f"guidellm ran past {timeout:.0f} s; its log: {log}")
                samples.append((time.time(), tree_cpu(process.pid)))
                time.sleep(0.5)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if process.returncode:
        raise SystemExit(f"guidellm exited with {process.returncode}; its log: {log}")
    elapsed = time.perf_counter() - start
    benchmark = json.loads((scenario.parent / "report.json").read_text())["benchmarks"][0]
    metrics = benchmark["metrics"]
    done = metrics["request_totals"]
    tokens = metrics["output_token_count"]["successful"]["total_sum"]
    # guidellm 0.8.1 sometimes closes its report while the last request is still streaming
    # (`processing_requests: 1`) and leaves that request out; its figures cover the rest.
    if (done["errored"] or done["successful"] < requests - 1
            or tokens != done["successful"] * NEW_TOKENS):
        raise SystemExit(f"guidellm finished {done} requests with {tokens} output tokens, "
                         f"not {requests} with {NEW_TOKENS} each; see {log}")

    def seconds_at(name: str, p: str) -> float:
        return metrics[name]["successful"]["percentiles"][p] / 1e3

    return {"tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"],
            "ttft_p50": seconds_at("time_to_first_token_ms", "p50"),
            "ttft_p99": seconds_at("time_to_first_token_ms", "p99"),
            "itl_p50": seconds_at("inter_token_latency_ms", "p50"),
            "itl_p99": seconds_at("inter_token_latency_ms", "p99"),
            "seconds": benchmark["duration"], "process_seconds": elapsed,
            "requests_counted": done["successful"],
            "client_cores": cores_between(samples, benchmark["start_time"],
                                          benchmark["end_time"])}


def cores_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Cores a process tree used from `start` to `end`, from its sampled CPU seconds."""
    times, cpu = zip(*samples, strict=True)
    return float(np.interp(end, times, cpu) - np.interp(start, times, cpu)) / (end - start)


def tool_version(tool_python: str) -> str:
    try:
        code = "from importlib.metadata import version; print(version('guidellm'))"
        found = subprocess.run([tool_python, "-c", code], capture_output=True, text=True,
                               timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        found = None
    if found is None or found.returncode:
        raise SystemExit(f"note: {tool_python} has no guidellm; make its virtualenv with "
                         "`python -m venv /work/venv-load && /work/venv-load/bin/pip install "
                         "guidellm` (see this script's docstring)")
    return found.stdout.strip()


def shown(metric: str, value: float) -> str:
    return f"{value:8.1f}" if metric == "tokens_per_s" else f"{value * 1e3:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool_python", default="/work/venv-load/bin/python",
                        help="a Python with guidellm installed, kept out of this environment")
    parser.add_argument("--concurrency", default="1,4,16", help="add 64 for the largest load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min_requests", type=int, default=16,
                        help="requests in a run: this many, at least 2 per stream")
    parser.add_argument("--timeout_s", type=float, default=600,
                        help="the most one guidellm run may take, start-up included")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    version = tool_version(args.tool_python)
    machine = cpu_seconds()
    source, experiment, workdir = prepared_model("load_tool_")
    root = source.parent
    rng = np.random.default_rng(0)

    def fresh(count: int) -> np.ndarray:
        return rng.integers(2, SHAPE["vocab_size"], (count, PROMPT_LEN)).astype(np.int64)

    print(f"guidellm {version} against the project's load generator: {PROMPT_LEN}-token "
          f"prompts, {NEW_TOKENS} new tokens (ignore_eos, greedy), streamed; medians of "
          f"{args.repeats} runs each, taken in turns")
    server = Server(experiment, workdir, root / "serve.log")
    contenders, checks, details = [], [], {"guidellm_version": version, "concurrency": {}}
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            per_worker = max(2, -(-args.min_requests // concurrency))
            requests = per_worker * concurrency
            drive(server, fresh(concurrency), concurrency, 1)  # new step sizes compile here
            start, server_start = cpu_seconds(), process_cpu(server.process.pid)
            runs = {"ours": [], "guidellm": []}
            for repeat in range(args.repeats):
                runs["ours"].append(run_ours(server, fresh(requests), concurrency))
                folder = root / f"guidellm_c{concurrency}_r{repeat}"
                folder.mkdir()
                scenario = write_scenario(folder, server.port, source, fresh(2 * requests),
                                          concurrency, requests)
                runs["guidellm"].append(run_tool(args.tool_python, scenario, requests,
                                                 args.timeout_s))
            share = others_share(start)
            if share is not None and start is not None:
                wall = time.time() - start[0]
                share -= (process_cpu(server.process.pid) - server_start) / (
                    wall * (os.cpu_count() or 1))
            ours = {m: float(np.median([r[m] for r in runs["ours"]])) for m in runs["ours"][0]}
            tool = {m: float(np.median([r[m] for r in runs["guidellm"]]))
                    for m in runs["guidellm"][0]}
            print(f"concurrency {concurrency}, {requests} requests a run (other processes "
                  f"used {share:.0%} of the CPU meanwhile)" if share is not None else
                  f"concurrency {concurrency}, {requests} requests a run")
            print(f"  {'':16s}{'ours':>8s}  {'guidellm':>8s}  guidellm/ours  "
                  f"runs (ours | guidellm)")
            for metric in METRICS:
                samples = " ".join(shown(metric, r[metric]).strip() for r in runs["ours"])
                tool_samples = " ".join(shown(metric, r[metric]).strip()
                                        for r in runs["guidellm"])
                print(f"  {LABELS[metric]:16s}{shown(metric, ours[metric])}  "
                      f"{shown(metric, tool[metric])}  {tool[metric] / ours[metric]:12.2f}   "
                      f"{samples} | {tool_samples}")
            print(f"  every gap between tokens (serve_lm.py's ITL), ours: p50 "
                  f"{ours['gap_p50'] * 1e3:.1f} ms, p99 {ours['gap_p99'] * 1e3:.1f} ms; the "
                  f"clients' CPU during their load: ours {ours['client_cores']:.2f} cores, "
                  f"guidellm {tool['client_cores']:.2f} cores; a guidellm run took "
                  f"{tool['process_seconds']:.0f} s for {tool['seconds']:.1f} s of load; "
                  f"guidellm counted {[r['requests_counted'] for r in runs['guidellm']]} "
                  f"requests")
            ours_tps = Contender(f"ours, concurrency {concurrency}",
                                 [r["tokens_per_s"] for r in runs["ours"]])
            tool_tps = Contender(f"guidellm, concurrency {concurrency}",
                                 [r["tokens_per_s"] for r in runs["guidellm"]],
                                 baseline=ours_tps)
            contenders += [ours_tps, tool_tps]
            checks += [Check(f"guidellm / ours, output tokens/s, concurrency {concurrency}",
                             tool_tps.ratio, at_least=0.9, at_most=1.1),
                       Check(f"guidellm / ours, ITL p50, concurrency {concurrency}",
                             tool["itl_p50"] / ours["itl_p50"], at_least=0.9, at_most=1.1)]
            details["concurrency"][str(concurrency)] = {"requests": requests,
                                                        "others_cpu_share": share, **runs}
    finally:
        server.stop()
    for check in checks:
        print(check.line())
    share = print_load(machine)
    if args.json:
        write_results(args.json, "load_tool", "output tokens/s", higher_is_better=True,
                      contenders=contenders, others_cpu_share=share, checks=checks,
                      details=details)


if __name__ == "__main__":
    main()
