"""Fast by default: the loop compiles once, the state is donated, the compilation cache is on
and reused, and a window of steps can be profiled."""

import collections
import contextlib
import gc
import gzip
import json
import re
import weakref

import jax
import numpy as np
import pytest
from conftest import run_cli

from scaling.config import experiments as config_lib
from scaling.data import element_spec
from scaling.errors import UserError
from scaling.runtime import checkpoint, profiling, startup_gc
from scaling.sharding import mesh as mesh_lib
from scaling.training import compiler_options, loop
from scaling.training import run as run_lib

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # a compile or a cache load
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def compilations():
    """(event, function name) for every trace and every XLA compile inside the block."""
    events = []

    def listener(event, duration, **kwargs):
        if event in (COMPILE_EVENT, TRACE_EVENT):
            events.append(("compile" if event == COMPILE_EVENT else "trace",
                           kwargs["fun_name"]))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def tiny_config(data_dir, *overrides):
    return config_lib.load_config("mnist_mlp", [
        f"data.manual_dir={data_dir}", "batch_size=64", "eval_batch_size=64",
        "log_every_steps=4", "steps_per_call=4", "eval_every_steps=8",
        "checkpoint_every_steps=8", *overrides])


def train_tiny(workdir, data_dir, *overrides, **kwargs):
    """On one device, where XLA compiles fastest; sharding changes nothing here."""
    config, module = tiny_config(data_dir, *overrides)
    return loop.train_and_evaluate(config, workdir, module, devices=jax.devices()[:1],
                                    **kwargs)


def test_more_calls_evaluations_and_checkpoints_compile_nothing_more(tmp_path, tiny_idx_dir):
    """What "compiles exactly once" covers: per run, the train call for its full chunk shape
    and the evaluation call each trace and compile once, the initialisation once, and nothing
    else, however many calls, evaluations and checkpoints follow. JAX's own small helpers
    (PRNG seeding, Orbax's slicing) compile once per process, so a first run warms them."""
    train_tiny(tmp_path / "warm", tiny_idx_dir, "num_steps=8")
    counts = {}
    for num_steps in (16, 32):  # 4 calls, 2 evaluations and 2 saves, then twice as many
        with compilations() as events:
            train_tiny(tmp_path / str(num_steps), tiny_idx_dir, f"num_steps={num_steps}")
        counts[num_steps] = collections.Counter(events)
    assert counts[16] == counts[32]
    for name in ("train_steps", "evaluate_chunk"):
        assert counts[32][("trace", name)] == 1, counts[32]
        assert counts[32][("compile", f"jit({name})")] == 1, counts[32]
    assert sum(n for (kind, _), n in counts[32].items() if kind == "compile") == 3


def test_start_up_runs_without_the_collector_and_training_with_it(tmp_path, tiny_idx_dir,
                                                                  monkeypatch):
    enabled = {}
    setup, save = run_lib.setup, checkpoint.save

    def spy_setup(*args, **kwargs):
        enabled["setup"] = gc.isenabled()
        return setup(*args, **kwargs)

    def spy_save(*args, **kwargs):
        enabled.setdefault("first save", gc.isenabled())
        return save(*args, **kwargs)

    monkeypatch.setattr(loop, "setup", spy_setup)
    monkeypatch.setattr(checkpoint, "save", spy_save)
    frozen_before = gc.get_freeze_count()
    startup_gc.pause()
    try:
        train_tiny(tmp_path, tiny_idx_dir, "num_steps=8")
        frozen_after = gc.get_freeze_count()
    finally:
        startup_gc.resume()  # in case training failed before it resumed the collector
        gc.unfreeze()
    assert enabled == {"setup": False, "first save": True}
    assert gc.isenabled() and frozen_after > frozen_before


def test_resuming_the_collector_frees_start_up_garbage_before_freezing_the_rest():
    class Node:
        pass

    startup_gc.pause()
    try:
        node = Node()
        node.cycle = node
        probe = weakref.ref(node)
        del node
        assert probe() is not None  # a reference cycle, and no collector to free it
        startup_gc.resume()
        assert probe() is None and gc.isenabled()
    finally:
        startup_gc.resume()
        gc.unfreeze()


def test_short_calls_compile_one_power_of_two_shape_each(tmp_path, tiny_idx_dir):
    num_steps, steps_per_call = 15, 4
    lengths, step = set(), 0
    while step < num_steps:
        lengths.add(loop.call_length(step, num_steps, steps_per_call))
        step += loop.call_length(step, num_steps, steps_per_call)
    with compilations() as events:
        train_tiny(tmp_path, tiny_idx_dir, f"num_steps={num_steps}",
                   f"steps_per_call={steps_per_call}", "eval_every_steps=1000",
                   "checkpoint_every_steps=1000")
    assert events.count(("compile", "jit(train_steps)")) == len(lengths) == 3
    assert lengths == {4, 2, 1}


TINY_LM = ["model.num_layers=1", "model.embed_dim=32", "model.mlp_dim=64",
           "model.head_dim=8", "data.seq_len=16", "model.max_seq_len=16", "batch_size=8"]


@pytest.mark.parametrize("experiment, overrides, num_devices", [
    ("fashion_mnist_mlp", [], 1),
    ("fashion_mnist_mlp", ["mesh.data=2", "mesh.fsdp=4"], 8),
    ("shakespeare_char_lm", TINY_LM, 1),
])
def test_train_call_donates_the_whole_state(experiment, overrides, num_devices):
    """XLA reuses the donated state's buffers for the new state: the aliased bytes equal the
    state's bytes on a device (params, optimizer state, step and rng), to within 1%."""
    config, module = config_lib.load_config(experiment, ["steps_per_call=2", *overrides])
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
    spec = element_spec(config)
    run = run_lib.build_run(config, mesh, spec, num_train=1000, experiment=module)
    chunk = {k: jax.ShapeDtypeStruct((2, config.batch_size) + v.shape, v.dtype)
             for k, v in spec.items()}
    lower = mesh_lib.with_mesh_rules(run.train_steps.inner.lower, mesh, run.rules)
    memory = lower(run.abstract_state, chunk).compile().memory_analysis()
    state_bytes = sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
                      for leaf in jax.tree_util.tree_leaves(run.abstract_state))
    assert 0.99 * state_bytes <= memory.alias_size_in_bytes <= state_bytes


def tiny_cli_args(data_dir, *extra):
    return ["--experiment=mnist_mlp", f"--config.data.manual_dir={data_dir}",
            "--config.num_steps=8", "--config.batch_size=64", "--config.eval_batch_size=100",
            *extra]


def test_second_run_loads_every_executable_from_the_cache(tmp_path, tiny_idx_dir):
    cache = tmp_path / "cache"
    args = tiny_cli_args(tiny_idx_dir, f"--compilation_cache_dir={cache}")
    first = run_cli(*args, f"--workdir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.glob("*-cache"))
    assert any(name.startswith("jit_train_steps-") for name in entries), entries

    second = run_cli(*args, f"--workdir={tmp_path / 'b'}", env_extra={"JAX_LOG_COMPILES": "1"})
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in cache.glob("*-cache")) == entries
    requests = re.findall(r"Compiling (jit\(\S+\)) with", second.stderr)
    hits = re.findall(r"Persistent compilation cache hit for '(\w+)'", second.stderr)
    assert {"jit_train_steps", "jit_evaluate_chunk"} <= set(hits)
    assert len(hits) == len(requests) > 0


def test_cache_defaults_under_home_and_empty_turns_it_off(tmp_path):
    env = {"HOME": str(tmp_path), "SCALING_CACHE_DIR": None}
    off = run_cli("--experiment=mnist_mlp", "--mode=describe", "--compilation_cache_dir=",
                  env_extra=env)
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / ".cache").exists()
    on = run_cli("--experiment=mnist_mlp", "--mode=describe", env_extra=env)
    assert on.returncode == 0, on.stderr
    assert (tmp_path / ".cache" / "scaling" / "jax").is_dir()


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--experiment=mnist_mlp", "--mode=describe",
                     f"--compilation_cache_dir={blocker}/cache")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert f"--compilation_cache_dir={blocker}/cache: cannot write there" in line


def test_unwritable_default_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--experiment=mnist_mlp", "--mode=describe",
                     env_extra={"HOME": str(blocker), "SCALING_CACHE_DIR": None})
    assert result.returncode == 0, result.stderr
    assert error_lines(result) == []
    warnings = [line for line in result.stderr.splitlines() if "compilation cache" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "parameters" in result.stdout


def test_profile_traces_whole_calls_around_the_window(tmp_path, tiny_idx_dir, capsys):
    window = profiling.parse_steps("6:10", "train")
    train_tiny(tmp_path, tiny_idx_dir, "num_steps=16", profile_steps=window)
    # Calls run steps 1-4, 5-8, 9-12, 13-16: the window widens to steps 5..12.
    assert f"profile: steps 5..12 traced to {tmp_path / 'profile'}" in capsys.readouterr().out
    [run_dir] = (tmp_path / "profile" / "plugins" / "profile").iterdir()
    assert list(run_dir.glob("*.xplane.pb")) and list(run_dir.glob("*.trace.json.gz"))
    with gzip.open(run_dir / "perfetto_trace.json.gz") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert "PjitFunction(train_steps)" in names

    # Resumed past the window, the run says so and traces nothing more.
    train_tiny(tmp_path, tiny_idx_dir, "num_steps=20", profile_steps=window)
    assert "nothing is traced" in capsys.readouterr().out
    assert len(list((tmp_path / "profile" / "plugins" / "profile").iterdir())) == 1


@pytest.mark.parametrize("value, mode, fragment", [
    ("ten:20", "train", "expected A:B"),
    ("0:3", "train", "1 <= A <= B"),
    ("9:3", "train", "1 <= A <= B"),
    ("3:", "train", "expected A:B"),
    ("3:5", "eval", "only --mode=train"),
])
def test_bad_profile_windows_are_user_errors(value, mode, fragment):
    with pytest.raises(UserError, match=re.escape(f"--profile_steps={value}: ") + ".*" +
                       re.escape(fragment)):
        profiling.parse_steps(value, mode)


def test_profile_window_past_the_run_is_refused_before_training(tmp_path, tiny_idx_dir):
    with pytest.raises(UserError, match=r"--profile_steps=5:99: the run has only 16 steps"):
        train_tiny(tmp_path, tiny_idx_dir, "num_steps=16",
                   profile_steps=profiling.parse_steps("5:99", "train"))
    assert not (tmp_path / "checkpoints").exists()


def test_bad_profile_flag_exits_2(tmp_path):
    result = run_cli("--experiment=mnist_mlp", "--profile_steps=9:3", f"--workdir={tmp_path}")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "--profile_steps=9:3" in line


def test_experiment_xla_options_reach_its_compiled_steps(tmp_path, tiny_idx_dir):
    """`xla_options.cpu` is passed to the train and eval steps' compiles (observed through an
    option with a visible effect: XLA dumps the programs it compiles), and a platform the
    mesh is not on contributes nothing."""
    config, module = tiny_config(tiny_idx_dir)
    dump = tmp_path / "dump"
    with config.unlocked():
        config.xla_options.cpu.xla_dump_to = str(dump)
        config.xla_options.tpu = {"xla_tpu_no_such_option": True}
    assert compiler_options.for_platform(config, "cpu") == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
        "xla_dump_to": str(dump)}
    loop.train_and_evaluate(config, tmp_path / "run", module, devices=jax.devices()[:1])
    dumped = {p.name for p in dump.iterdir()}
    for name in ("train_steps", "evaluate_chunk"):
        assert any(f"jit_{name}" in n and n.endswith(".txt") for n in dumped), sorted(dumped)


@pytest.mark.parametrize("name, value, fragment", [
    ("xla_cpu_no_such_option", "1", "xla_cpu_no_such_option"),
    ("xla_cpu_experimental_ynn_fusion_type", "bogus", "'bogus' is not a valid enum value"),
])
def test_bad_xla_options_are_user_errors_naming_the_key(tiny_idx_dir, name, value, fragment):
    config, module = tiny_config(tiny_idx_dir)
    with config.unlocked():
        config.xla_options.cpu[name] = value
    with pytest.raises(UserError, match=rf"--config\.xla_options\.cpu\.{name}=") as error:
        run_lib.setup(config, module, devices=jax.devices()[:1])
    assert fragment in str(error.value)


def test_bad_xla_option_value_exits_2(tmp_path, tiny_idx_dir):
    result = run_cli(*tiny_cli_args(tiny_idx_dir, f"--workdir={tmp_path}",
                                    "--config.xla_options.cpu.xla_cpu_experimental_ynn_fusion_"
                                    "type=bogus"))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "--config.xla_options.cpu.xla_cpu_experimental_ynn_fusion_type='bogus'" in line
    assert not (tmp_path / "checkpoints").exists()
