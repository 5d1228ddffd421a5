"""lm-evaluation-harness through the server, against the same tasks scored by transformers.

Serves a Hugging Face directory with `python -m scaling.serve --model=DIR`, runs the local
tasks in `bench/lm_eval_tasks/` (a multiple-choice task and a rolling-perplexity task, their
data in JSON Lines beside them) with lm-eval's `local-completions` model (echoed prompt
log-probabilities, batches of prompts as token ids), then the same tasks with lm-eval's `hf`
model on the same directory in this process, and prints every request's log-likelihood from
both, their largest difference, and both sets of scores.

lm-eval and torch stay out of the project's environment; run this with a Python that has
them, naming the project's Python for the server:

    python -m venv /work/venv-eval && /work/venv-eval/bin/pip install 'lm-eval[api]' torch
    /work/venv-eval/bin/python bench/lm_eval_server.py --server_python=python3 \
        [--model=tests/fixtures/hf/llama3_instruct]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_NAMES = ["tiny_qa", "tiny_text"]


def start_server(server_python: str, model: Path, log: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [server_python, "-m", "scaling.serve", f"--model={model}", "--port=0",
         "--max_num_seqs=8", "--kv_block_size=16"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    for line in process.stdout:
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if found:
            return process, int(found.group(1))
    raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")


def served_name(port: int) -> str:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
        return json.loads(response.read())["data"][0]["id"]


def evaluate(model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    previous = Path.cwd()
    os.chdir(TASKS)  # the task files name their data relative to this folder
    try:
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=TASK_NAMES,
            task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
            batch_size=4)
    finally:
        os.chdir(previous)


def loglikelihoods(results: dict) -> dict[tuple[str, int, int], float]:
    """Each request's log-likelihood, keyed by task, document and choice."""
    out = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            for k, response in enumerate(sample["filtered_resps"]):
                value = response[0] if isinstance(response, (list, tuple)) else response
                out[(task, sample["doc_id"], k)] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path,
                        default=REPO / "tests" / "fixtures" / "hf" / "llama3_instruct")
    parser.add_argument("--server_python", default="python3",
                        help="the Python with this project installed, for the server")
    args = parser.parse_args()
    model = args.model.resolve()
    log = Path("/tmp") / f"lm_eval_server-{os.getpid()}.log"
    process, port = start_server(args.server_python, model, log)
    try:
        name = served_name(port)
        started = time.perf_counter()
        # lm-eval's API models add no begin-of-text id unless told; its hf model adds the
        # tokenizer's. add_bos_token=True gives both the same token ids.
        served = evaluate("local-completions", (
            f"model={name},base_url=http://127.0.0.1:{port}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={model},num_concurrent=2,"
            "max_retries=1,tokenized_requests=True,max_length=256,add_bos_token=True"))
        served_s = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)
    started = time.perf_counter()
    reference = evaluate("hf", f"pretrained={model},dtype=float32,device=cpu,max_length=256")
    reference_s = time.perf_counter() - started
    ours, theirs = loglikelihoods(served), loglikelihoods(reference)
    if ours.keys() != theirs.keys():
        raise SystemExit(f"the two runs scored different requests: {sorted(ours)[:5]} ... "
                         f"against {sorted(theirs)[:5]} ...")
    print("task       doc choice   server loglik   transformers loglik")
    for key in sorted(ours):
        print(f"{key[0]:10s} {key[1]:3d} {key[2]:6d} {ours[key]:15.6f} {theirs[key]:21.6f}")
    worst = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"\n{len(ours)} log-likelihoods; largest difference {worst:.2e}")
    for task in TASK_NAMES:
        mine = {k: v for k, v in served["results"][task].items() if "," in k}
        print(f"{task}: server {mine}")
        print(f"{' ' * len(task)}  transformers "
              f"{ {k: v for k, v in reference['results'][task].items() if ',' in k} }")
    print(f"lm-eval through the server {served_s:.1f} s, lm-eval's hf model {reference_s:.1f} s "
          "(nothing else ran)")
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
