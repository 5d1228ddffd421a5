"""Supervised fine-tuning: pairs packed whole with the loss on responses only, JSON Lines
sources, the exact-match metric, and the addition experiment learning on the CPU."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import run_cli
from test_cli import assert_user_error

from scaling.data import sft
from scaling.data.tokenizer import ByteTokenizer
from scaling.errors import UserError
from scaling.runtime.metrics import read_metrics
from scaling.training.tasks import get_task


def test_pairs_pack_whole_with_weights_on_the_response_and_its_end_only():
    tokenizer = ByteTokenizer()  # no begin-of-text id; end of text is 256
    pairs = [("ab=", "c"), ("de=", "fg"), ("hijk=", "lmnop")]
    packed, cut = sft.pack(pairs, tokenizer, seq_len=11)
    assert cut == 0
    # 3 + 1 + 1 and 3 + 2 + 1 tokens share a window of 12; the third (11 tokens) needs its own.
    assert packed["tokens"].shape == (2, 12) and packed["weights"].shape == (2, 11)
    row = packed["tokens"][0]
    assert bytes(row[:4].tolist()) == b"ab=c" and row[4] == 256
    assert bytes(row[5:10].tolist()) == b"de=fg" and row[10] == 256
    assert packed["segment_ids"][0].tolist() == [1] * 5 + [2] * 6 + [0]
    assert packed["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]
    # Target t is token t + 1: weighted for c and its end, then f, g and their end.
    assert packed["weights"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0]
    assert packed["weights"][1].sum() == 6  # lmnop and the end
    _, cut = sft.pack([("a" * 20, "b")], tokenizer, seq_len=11)
    assert cut == 1


def data_config(tmp_path, **values):
    return ml_collections.ConfigDict({"seed": 0, "data": {
        "sft_source": f"jsonl:{tmp_path}/*.jsonl", "prompt_field": "question",
        "response_field": "answer", "validation_fraction": 0.5, "on_malformed": "error",
        "synthetic_examples": 10, **values}})


def test_jsonl_pairs_take_the_configured_fields_and_name_a_malformed_line(tmp_path):
    lines = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[:20] + ["{not json"] + lines[20:]))
    with pytest.raises(UserError, match=r"pairs.jsonl:21: not a JSON object"):
        sft.read_pairs(data_config(tmp_path))
    splits = sft.read_pairs(data_config(tmp_path, on_malformed="skip"))
    assert sorted(splits["train"] + splits["validation"]) == sorted(
        (f"q{i}", f"a{i}") for i in range(40))
    assert 5 < len(splits["validation"]) < 35


def test_exact_match_counts_pairs_whose_every_response_token_is_the_argmax():
    packed, _ = sft.pack([("ab=", "c"), ("de=", "fg")], ByteTokenizer(), seq_len=11)
    batch = {k: jnp.asarray(v) for k, v in packed.items()} | {"mask": jnp.ones(1, bool)}
    targets = packed["tokens"][0, 1:]
    logits = np.zeros((1, 11, 257), np.float32)
    logits[0, np.arange(11), targets] = 5.0  # every target right ...
    task = get_task("sft")
    summary = task.summarize(task.eval_sums(jnp.asarray(logits), batch))
    assert summary["exact_match"] == 1.0 and summary["num_pairs"] == 2
    logits[0, 8, :] = 0.0
    logits[0, 8, 0] = 5.0  # ... but the g of the second pair
    summary = task.summarize(task.eval_sums(jnp.asarray(logits), batch))
    assert summary["exact_match"] == 0.5 and summary["accuracy"] == pytest.approx(4 / 5)


def test_addition_experiment_learns_from_its_generated_pairs(tmp_path):
    result = run_cli("--experiment=addition_sft", f"--workdir={tmp_path}",
                     "--config.num_steps=120", "--config.eval_every_steps=120",
                     "--config.batch_size=16", "--config.optimizer.warmup_steps=20",
                     "--config.data.synthetic_examples=4000")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(tmp_path) if r["split"] == "validation"]
    # Untrained: a loss of ln 16 = 2.8 and a token accuracy near 0.1.
    assert evals[-1]["loss"] < 1.8 and evals[-1]["accuracy"] > 0.3, evals[-1]
    assert 0 <= evals[-1]["exact_match"] <= 1 and evals[-1]["num_pairs"] > 100
    sample = run_cli("--experiment=addition_sft", f"--workdir={tmp_path}", "--mode=sample",
                     "--prompt=12+34=", "--temperature=0")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.splitlines()[-1].startswith("12+34=")


def test_an_unknown_synthetic_task_exits_2_naming_the_flag(tmp_path):
    result = run_cli("--experiment=addition_sft", f"--workdir={tmp_path}",
                     "--config.data.sft_source=synthetic:multiply")
    assert_user_error(result, "--config.data.sft_source=synthetic:multiply", "add, reverse")
