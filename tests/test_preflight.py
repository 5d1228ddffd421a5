"""Preflight: the compiled step's memory, FLOPs and collectives, against the formulas.

Collective bytes follow the convention of `scaling.preflight.hlo` (the buffer per device, per
step) and must agree with the model's own formula (`step_report.analytic_collectives`) within
`step_report.TOLERANCE` (5%) of the analytic total, group by group. The step is compiled
through `run.lower_train_step`, as training lowers it.
"""

import importlib.util
import json

import jax
import pytest
from conftest import run_cli, write_custom_experiment

from scaling.config import experiments as config_lib
from scaling.errors import UserError
from scaling.preflight import hlo, step_report, topology
from scaling.sharding import mesh as mesh_lib
from scaling.training import run as run_lib
from scaling.training import state_summary
from scaling.training.state_summary import parameter_count

TINY_LM = ["num_steps=1000", "batch_size=16", "eval_batch_size=16", "steps_per_call=1",
           "data.seq_len=32", "model.max_seq_len=32", "model.num_layers=3",
           "model.embed_dim=64", "model.mlp_dim=128", "model.num_heads=8",
           "model.num_kv_heads=8", "model.head_dim=8", "model.vocab_size=256",
           "model.tie_embeddings=False",
           "model.scan_unroll=1"]  # a layer loop, as large models keep: backward re-gathers
MESHES = {"dp": ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
          "fsdp": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
          "tp": ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"],
          "dp, 2 microbatches": ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1",
                                 "grad_accum_steps=2"],
          "context": ["mesh.data=2", "mesh.fsdp=1", "mesh.context=4", "mesh.tensor=1"]}
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu: "
                                         "pip install -e '.[tpu]'")


def tiny_lm(*overrides):
    return config_lib.load_config("shakespeare_char_lm", TINY_LM + list(overrides))


def abstract_params(config, module, devices):
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    return run_lib.build_run_from_shapes(config, mesh, module).abstract_state.params


@pytest.mark.parametrize("parallelism", MESHES)
def test_collective_bytes_agree_with_the_analytic_formulas(parallelism):
    config, module = tiny_lm(*MESHES[parallelism])
    report = step_report.preflight(config, step_report.make_target(None, config), module)
    measured = report["collective_groups"]["measured"]
    analytic = report["collective_groups"]["analytic"]
    allowed = step_report.TOLERANCE * sum(analytic.values())
    for group in step_report.GROUPS:
        assert measured[group] == pytest.approx(analytic[group], abs=allowed), group
    # The formulas themselves, in numbers: float32 everywhere, 16 sequences of 32 tokens.
    params = abstract_params(config, module, jax.devices())
    if parallelism.startswith("dp"):  # every gradient all-reduced once a microbatch
        microbatches = config.grad_accum_steps
        assert analytic[step_report.GRADIENTS] == 4 * parameter_count(params) * microbatches
        assert measured["all-gather"] == 0 and measured[step_report.GRADIENTS] > 0
    elif parallelism == "fsdp":  # every param gathered once, the layers' again for backward
        assert analytic["all-gather"] == 4 * (parameter_count(params)
                                          + parameter_count(params["layers"]))
        assert analytic[step_report.GRADIENTS] == 4 * parameter_count(params)
    elif parallelism == "context":  # keys and values of 8 rows gathered whole, and logits
        kv, logits = 8 * 32 * 8 * 8 * 4, 8 * 32 * 256 * 4
        assert analytic["all-gather"] == 2 * 3 * kv + logits
        # Gradients all-reduced over data and, separately, over context; keys', values' and
        # logits' gradients reduced back.
        assert analytic[step_report.GRADIENTS] == (2 * 4 * parameter_count(params)
                                                   + 2 * 3 * kv + logits)
    else:  # per layer 2 forward + 5 backward activation all-reduces, 2 for the vocabulary
        activation = 16 * 32 * 64 * 4
        assert analytic[step_report.GRADIENTS] == (7 * 3 + 2) * activation
    flops = report["flops_per_device"]
    assert flops["compiled_matmuls"] == pytest.approx(flops["model"], rel=0.01)
    assert report["memory_per_device"]["peak"] > 0 and report["fits"] is None


LOOP_HLO = """HloModule loop, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (c: (s32[], f32[8,64])) -> pred[] {
  %c = (s32[], f32[8,64]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(6)
  ROOT %lt = pred[] compare(%k, %limit), direction=LT
}

%body (t: (s32[], f32[8,64])) -> (s32[], f32[8,64]) {
  %t = (s32[], f32[8,64]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%t), index=0
  %x = f32[8,64]{1,0} get-tuple-element(%t), index=1
  %ag = (f32[8,64]{1,0}, f32[64,64]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3,4,5,6,7}}
  %w = f32[64,64]{1,0} all-gather-done(%ag)
  %y = f32[8,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[8,64]{1,0} all-reduce(%y), replica_groups=[2,4]<=[8], to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%n, %one)
  ROOT %out = (s32[], f32[8,64]{1,0}) tuple(%next, %r)
}

ENTRY %main (x0: f32[8,64]) -> f32[8,64] {
  %x0 = f32[8,64]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,64]{1,0}) tuple(%zero, %x0)
  %loop = (s32[], f32[8,64]{1,0}) while(%init), condition=%cond, body=%body LOOP_CONFIG
  %res = f32[8,64]{1,0} get-tuple-element(%loop), index=1
  ROOT %perm = f32[8,64]{1,0} collective-permute(%res), source_target_pairs={{0,1},{1,0}}
}
"""


@pytest.mark.parametrize("loop_config, step, trips", [
    ("", 1, 6),  # i = 0; while i < 6: i += 1
    ("", 2, 3),  # unrolled by two, as TPU's windowed matmul loops are
    (', backend_config={"known_trip_count":{"n":"10"}}', 1, 10),  # XLA's annotation wins
])
def test_hlo_counts_each_collective_once_per_loop_trip(loop_config, step, trips):
    text = LOOP_HLO.replace(" LOOP_CONFIG", loop_config).replace("constant(1)",
                                                                 f"constant({step})")
    counts = hlo.count_step(text)
    found = {c.kind: c for c in counts.collectives}
    shard = 8 * 64 * 4
    assert set(found) == {"all-gather", "all-reduce", "collective-permute"}
    assert (found["all-gather"].bytes, found["all-gather"].group_size) == (8 * shard, 8)
    assert found["all-gather"].wire_bytes == 8 * shard * 7 / 8
    assert (found["all-reduce"].bytes, found["all-reduce"].group_size) == (shard, 4)
    assert found["all-reduce"].wire_bytes == shard * 2 * 3 / 4
    assert found["all-gather"].count == found["all-reduce"].count == trips
    assert found["collective-permute"].count == 1
    assert counts.matmul_flops == trips * 2 * 8 * 64 * 64
    assert counts.unknown_trip_counts == 0


@pytest.mark.parametrize("name, shape, chips", [
    ("v5p-128", (4, 4, 4), 64), ("v4-32", (2, 2, 4), 16), ("v5p-8", (2, 2, 1), 4),
    ("v5e-256", (16, 16), 256), ("v6e-64", (8, 8), 64), ("v5e-8", (2, 4), 8),
])
def test_slice_names_map_to_torus_shapes(name, shape, chips):
    slice_ = topology.parse_slice(name)
    assert (slice_.shape, slice_.num_chips) == (shape, chips)


@pytest.mark.parametrize("name", ["v5p-12", "v7x-8", "v5e-2", "tpu"])
def test_unknown_slice_names_list_the_known_ones(name):
    with pytest.raises(UserError) as error:
        topology.parse_slice(name)
    message = str(error.value)
    assert message.startswith(f"--topology={name}: unknown TPU slice; known: v4-8, ")
    assert all(known in message for known in ("v5p-8", "v5e-256", "v6e-256"))


@needs_libtpu
def test_preflight_for_a_tpu_slice_reports_memory_flops_and_time():
    config, module = tiny_lm("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4",
                             "model.dtype=bfloat16")
    target = step_report.make_target("v5e-8", config)
    assert len(target.devices) == 8 and target.chip.name == "TPU v5e"
    report = step_report.preflight(config, target, module)
    memory = report["memory_per_device"]
    mesh = mesh_lib.make_mesh(config.mesh, target.devices)
    state = run_lib.build_run_from_shapes(config, mesh, module).abstract_state
    assert memory["arguments"] >= state_summary.bytes_per_device(state) > 0
    assert memory["peak"] < target.chip.hbm_bytes and report["fits"] is True
    # XLA's own count of the bytes in use at once, beside the allocations added whole.
    assert memory["live_at_once"] > 0
    assert "live at once" in step_report.format_report(report)
    flops = report["flops_per_device"]
    assert flops["compiled_matmuls"] == pytest.approx(flops["model"], rel=0.01)
    assert step_report.agrees(report["collective_groups"]["measured"],
                            report["collective_groups"]["analytic"])
    estimate = report["estimate"]
    assert estimate["step_seconds"] >= max(estimate["compute_seconds"],
                                           estimate["memory_seconds"]) > 0
    assert 0 < estimate["mfu_bound"] <= 1
    # The same step on a chip with a quarter of the peak's memory, as the message reads it.
    small = {**report, "chip": {**report["chip"], "hbm_bytes": memory["peak"] / 4}}
    message = step_report.does_not_fit_message(small, config)
    peak = state_summary.format_bytes(memory["peak"])
    over = state_summary.format_bytes(memory["peak"] * 3 / 4)
    assert message.startswith(f"does not fit: needs {peak} per chip, {over} (300%) over the ")
    assert "of TPU v5e HBM; try " in message


@needs_libtpu
def test_oversized_step_exits_4_saying_by_how_much(tmp_path):
    """A 1-layer model with a 2^30-entry embedding: 4 GiB of float32 params, then gradients
    and two Adam moments, on one 16 GiB v5e chip."""
    result = run_cli("--experiment=shakespeare_char_lm", "--mode=preflight",
                     "--topology=v5e-1", f"--workdir={tmp_path}", *[
                         f"--config.{o}" for o in TINY_LM + [
                             "model.num_layers=1", "model.vocab_size=262144",
                             "model.embed_dim=4096", "model.num_heads=32",
                             "model.num_kv_heads=32", "model.head_dim=128",
                             "model.tie_embeddings=True"]],
                     timeout=300)
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "preflight.json").read_text())
    peak, hbm = report["memory_per_device"]["peak"], 16 * 2**30
    assert report["fits"] is False and peak > 4 * 2**30 * 3  # params and two Adam moments
    over = f"{state_summary.format_bytes(peak - hbm)} ({(peak - hbm) / hbm:.0%}) over"
    assert errors[0].startswith("error: does not fit: needs ")
    assert f"{over} the 16.0 GiB of TPU v5e HBM; try " in errors[0]
    assert "memory per device" in result.stdout and "does not fit" in result.stdout


def test_unknown_topology_is_a_user_error(tmp_path):
    result = run_cli("--experiment=shakespeare_char_lm", "--mode=preflight",
                     "--topology=v5p-100", f"--workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "error: --topology=v5p-100: unknown TPU slice; known: " in result.stderr
    assert not (tmp_path / "preflight.json").exists()


def test_local_devices_need_no_topology():
    target = step_report.make_target(None, tiny_lm()[0])
    assert target.devices == jax.devices() and target.chip is None


CUSTOM_RULES = ("sharding_rules=(('batch', ('data', 'fsdp')), ('embed', 'fsdp'), "
                "('widgets', None))")


def custom_experiment(tmp_path, extra: str = ""):
    path = write_custom_experiment(tmp_path, extra)
    return config_lib.load_config(str(path), [CUSTOM_RULES, "mesh.data=8"])


def test_a_model_without_formulas_gets_none_and_no_verdict(tmp_path):
    config, module = custom_experiment(tmp_path)
    report = step_report.preflight(config, step_report.make_target(None, config), module)
    assert report["collective_groups"]["analytic"] is None
    assert report["flops_per_device"]["model"] is None
    text = step_report.format_report(report)
    assert text.count("no formula for this model") == 2
    assert "they agree" not in text and "they differ" not in text
    measured = report["collective_groups"]["measured"]
    assert measured[step_report.GRADIENTS] >= 4 * 784 * 10  # its one kernel, all-reduced


def test_an_experiment_provides_its_own_formulas(tmp_path):
    hooks = '''

def flops_per_example(model, config, params):
    # One kernel on the input: forward and weight gradient only, no input gradient.
    return 4.0 * 784 * 10


def collective_bytes(model, config, layout):
    return {"all-reduce + reduce-scatter": 4.0 * 784 * 10 if layout.data_parallel > 1 else 0}
'''
    config, module = custom_experiment(tmp_path, hooks)
    report = step_report.preflight(config, step_report.make_target(None, config), module)
    groups = report["collective_groups"]
    assert groups["analytic"] == {**dict.fromkeys(step_report.GROUPS, 0.0),
                                  step_report.GRADIENTS: 4.0 * 784 * 10}
    assert step_report.agrees(groups["measured"], groups["analytic"])
    flops = report["flops_per_device"]
    assert flops["model"] == 4.0 * 784 * 10 * config.batch_size / 8
    assert flops["compiled_matmuls"] == pytest.approx(flops["model"], rel=0.01)
