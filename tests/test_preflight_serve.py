"""`--mode=preflight --serve`: the engine's programs compiled for a TPU slice, unrun.

A tiny LM whose KV cache is large (16,384 positions of 4 layers × 8 heads of 128 in bfloat16,
256 MiB a sequence) fills one v5e chip's 16 GiB with a few dozen sequences, so the largest
batch is found by compiling a handful of small programs.
"""

import dataclasses
import importlib.util
import json

import pytest
from conftest import run_cli

from scaling import main
from scaling.config import experiments as config_lib
from scaling.engine import EngineOptions
from scaling.preflight import serve, step_report
from scaling.training.state_summary import format_bytes

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu: "
                                         "pip install -e '.[tpu]'")
CONTEXT = 16384
TINY_LM = ["num_steps=10", "batch_size=16", "eval_batch_size=16", "data.seq_len=32",
           f"model.max_seq_len={CONTEXT}", "model.num_layers=4", "model.embed_dim=256",
           "model.mlp_dim=512", "model.num_heads=8", "model.num_kv_heads=8",
           "model.head_dim=128", "model.vocab_size=256", "model.dtype=bfloat16"]


def cli(tmp_path, *args):
    return run_cli("--experiment=shakespeare_char_lm", "--mode=preflight", "--serve",
                   "--topology=v5e-1", f"--workdir={tmp_path}",
                   *[f"--config.{o}" for o in TINY_LM], *args, timeout=600)


def test_the_preflight_takes_the_servers_engine_flags():
    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    assert set(main.SERVE_FLAGS) | {"quantize"} == fields


@needs_libtpu
def test_largest_batch_fits_and_one_more_exits_4(tmp_path):
    config, module = config_lib.load_config("shakespeare_char_lm", TINY_LM)
    target = step_report.make_target("v5e-1", config)
    report = serve.serve_preflight(config, target, EngineOptions(), experiment=module)
    hbm = target.chip.hbm_bytes
    # Weights, cache, both programs' traffic and time, and decode against its bound.
    assert report["decode_attention"] == "TPU paged-attention kernel"
    assert report["pool"]["bytes_per_device"] == 16 * CONTEXT * 4 * 2 * 8 * 128 * 2
    for name in ("decode", "prefill"):
        program = report["programs"][name]
        assert program["hbm_bytes_per_device"] > 0 and program["estimate"]["step_seconds"] > 0
    bound = report["decode_bound"]
    assert bound["bytes_read"] == pytest.approx(
        report["weights_per_device"] + report["pool"]["bytes_per_device"])
    assert 0 < bound["share"] <= 1
    text = serve.format_report(report)
    for field in ("weights", "KV cache", "decode: 16 rows", "prefill: 1 rows", "HBM traffic",
                  "estimated time", "expected share of the bound", "largest batch"):
        assert field in text, field
    # The largest batch: its decode program, compiled, fits; one more row does not.
    largest = report["largest_batch"]
    peaks = {int(n): p for n, p in report["search_peaks"].items()}
    assert largest > 0 and report["largest_batch_checked"]
    assert peaks[largest] <= hbm < peaks[largest + 1]
    assert f"--max_num_seqs={largest} --num_kv_blocks={largest * CONTEXT // 16}" in text

    refused = cli(tmp_path, f"--max_num_seqs={largest + 1}")
    assert refused.returncode == 4, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr
    written = json.loads((tmp_path / serve.REPORT_FILE).read_text())
    over = written["peak_per_device"] - hbm
    assert errors[0].startswith("error: does not fit: the serving programs need ")
    assert f"{format_bytes(over)} ({over / hbm:.0%}) over the 16.0 GiB of TPU v5e HBM" \
        in errors[0]
    assert f"at most {largest} sequences fit: try --max_num_seqs={largest} " in errors[0]


def test_context_beyond_the_model_exits_2_naming_the_flag(tmp_path):
    result = cli(tmp_path, f"--context={CONTEXT + 1}")
    assert result.returncode == 2, result.stderr
    assert f"error: --context={CONTEXT + 1}: must be between 1 and the model's max_seq_len " \
        f"{CONTEXT}" in result.stderr
    assert not (tmp_path / serve.REPORT_FILE).exists()
