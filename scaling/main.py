"""Command line: `python -m scaling.main --experiment=NAME_OR_PATH [--config.KEY=VALUE ...]`.

The only module that defines flags. It parses them, loads the experiment, prepares the workdir
and dispatches a mode. Every user mistake ends here as one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from scaling.config import experiments as config_lib
from scaling.errors import EXIT_USER_ERROR, UserError, exit_on_error
from scaling.runtime import compile_cache, platforms, profiling, startup_gc
from scaling.runtime import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None,
                    "Experiment name (experiments/NAME.py) or path to an experiment .py file.")
flags.DEFINE_string("workdir", None,
                    "Directory for config.json, metrics.jsonl, checkpoints and TensorBoard "
                    "events. Default: runs/EXPERIMENT under the current directory.")
flags.DEFINE_string("mode", "train", "One of: train, eval, sample, describe, predict, prepare, "
                    "export, import_hf, export_hf, preflight.")
flags.DEFINE_string("prompt", "\n", "--mode=sample: the text to continue.")
flags.DEFINE_integer("max_new_tokens", None, "--mode=sample: tokens to generate "
                     "(default: config.sample.max_new_tokens).")
flags.DEFINE_float("temperature", None, "--mode=sample: softmax temperature, 0 for greedy "
                   "(default: config.sample.temperature).")
flags.DEFINE_integer("top_k", None, "--mode=sample: keep the k most likely tokens, 0 for all "
                     "(default: config.sample.top_k). --mode=predict: report the k most likely "
                     "classes, 0 for all (default: 3).")
flags.DEFINE_integer("sample_seed", 0, "--mode=sample: the seed; equal seeds give equal text.")
flags.DEFINE_integer("num_devices", None, "--mode=describe: size the mesh for this many "
                     "devices instead of the local ones.")
flags.DEFINE_string("topology", None, "--mode=preflight: compile for this TPU slice (v5p-128, "
                    "v5e-256, v6e-64, v4-32, ...) instead of the local devices; needs the "
                    "tpu extra.")
flags.DEFINE_bool("serve", False, "--mode=preflight: compile the serving engine's prefill and "
                  "decode programs instead of the train step, with the flags python -m "
                  "scaling.serve takes (--max_num_seqs, --kv_cache_dtype, --quantize, --mesh.*, "
                  "...), and report the largest batch that fits at --context.")
flags.DEFINE_integer("context", None, "--mode=preflight --serve: the positions each sequence "
                     "holds, for the programs' block tables and the largest batch (default: "
                     "the model's max_seq_len).")
# The engine's options, as python -m scaling.serve names them (scaling.engine.EngineOptions,
# whose defaults apply where these are unset; tests/test_preflight_serve.py holds the two
# lists together). --quantize, shared with other modes, is defined below.
SERVE_FLAGS = {"max_num_seqs": flags.DEFINE_integer, "kv_block_size": flags.DEFINE_integer,
               "num_kv_blocks": flags.DEFINE_integer, "kv_cache_gib": flags.DEFINE_float,
               "prefill_chunk": flags.DEFINE_integer, "max_queue": flags.DEFINE_integer,
               "kv_cache_dtype": flags.DEFINE_string}
for _name, _define in SERVE_FLAGS.items():
    _define(_name, None, f"--mode=preflight --serve: the server's --{_name}.")
flags.DEFINE_string("inputs", None, "--mode=predict: a PNG, JPEG or NPY file, a directory of "
                    "them, or split:NAME of the experiment's dataset (e.g. split:test).")
flags.DEFINE_string("output", None, "--mode=predict: the .jsonl or .csv file to write "
                    "(default: WORKDIR/predictions.jsonl).")
flags.DEFINE_integer("checkpoint_step", None, "--mode=predict, export and export_hf: the "
                     "checkpoint to use (default: the latest).")
flags.DEFINE_string("artifact", None, "--mode=export: the directory to write (default: "
                    "WORKDIR/export); --mode=export_hf: the Hugging Face directory to write "
                    "(default: WORKDIR/hf).")
flags.DEFINE_string("source", None, "--mode=import_hf: the Hugging Face model directory "
                    "(config.json, *.safetensors, tokenizer.json) to import.")
flags.DEFINE_string("quantize", None, "--mode=export: int8 stores weight matrices as int8 "
                    "with one scale per output unit (default: float weights). --mode=sample: "
                    "int8 samples from int8 kernels, as python -m scaling.serve "
                    "--quantize=int8 serves them.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0. "
                    "Not needed on TPU pods or under SLURM, where it is detected.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id, from 0.")
flags.DEFINE_integer("distributed_timeout", 120, "Multi-process: seconds to wait for the "
                     "others at start-up, and before a lost process fails the rest.")
flags.DEFINE_bool("allow_config_change", False, "Restore checkpoints even though the model "
                  "config differs from the one in the workdir's config.json (shapes and dtypes "
                  "must still match).")
flags.DEFINE_bool("list", False, "List the experiments with their descriptions, then exit.")
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache, so a "
                    "re-run starts without compiling. Default: $SCALING_CACHE_DIR, else "
                    "~/.cache/scaling/jax; empty turns it off.")
flags.DEFINE_string("profile_steps", None, "--mode=train: write a jax.profiler trace of steps "
                    "A:B (from 1, inclusive, widened to whole compiled calls) to WORKDIR/profile.")

_overrides: list[str] = []


def parse_flags(argv: list[str]) -> list[str]:
    overrides, rest = config_lib.split_overrides(argv)
    _overrides[:] = overrides
    try:
        return FLAGS(rest)
    except flags.Error as e:
        _fail(str(e))


@dataclasses.dataclass(frozen=True)
class Mode:
    """What `--mode=NAME` runs, and what it needs first."""
    run: Callable[[Any, Path, Any], None]   # (config, workdir, experiment)
    records_start: bool = True   # appends to provenance.jsonl and guards the model config
    exclusive: bool = False      # holds the workdir's run lock (one writer at a time)
    reads_ahead: bool = False    # starts reading the dataset while the framework imports
    needs_jax: bool = True       # False: runs before JAX is imported, with no workdir


def initial_params_of(config):
    """`init_from` as the loop takes it: abstract params -> params (None: no source)."""
    if not config.init_from:
        return None
    from scaling.inference import sources

    return lambda abstract_params: sources.initial_params(config.init_from, config,
                                                          abstract_params)


def run_train(config, workdir: Path, experiment) -> None:
    from scaling.training import loop

    loop.train_and_evaluate(config, workdir, experiment, profile_steps=profiling.parse_steps(
        FLAGS.profile_steps, FLAGS.mode), initial_params=initial_params_of(config))


def run_eval(config, workdir: Path, experiment) -> None:
    from scaling.training import loop

    for split, values in loop.evaluate_checkpoint(config, workdir, experiment,
                                                  initial_params_of(config)).items():
        print(f"{split} {loop.format_metrics(values)}")


def run_sample(config, workdir: Path, experiment) -> None:
    print(sample_text_from_flags(config, workdir, experiment), flush=True)


def run_predict(config, workdir: Path, experiment) -> None:
    from scaling.inference import predict

    print(predict.predict_to_file(config, workdir, predict.PredictOptions(
        inputs=FLAGS.inputs, output=FLAGS.output, top_k=FLAGS.top_k,
        checkpoint_step=FLAGS.checkpoint_step), experiment), flush=True)


def run_export(config, workdir: Path, experiment) -> None:
    from scaling.inference import export

    print(export.export_checkpoint(config, workdir, export.ExportOptions(
        artifact=FLAGS.artifact, quantize=FLAGS.quantize,
        checkpoint_step=FLAGS.checkpoint_step), experiment), flush=True)


def run_import_hf(config, workdir: Path, experiment) -> None:
    from scaling.inference import hf_checkpoint

    print(hf_checkpoint.import_checkpoint(config, workdir, FLAGS.source, experiment),
          flush=True)


def run_export_hf(config, workdir: Path, experiment) -> None:
    from scaling.inference import hf_checkpoint

    message = hf_checkpoint.export_checkpoint(config, workdir, hf_checkpoint.ExportOptions(
        target=FLAGS.artifact, checkpoint_step=FLAGS.checkpoint_step), experiment)
    if message:
        print(message, flush=True)


def run_prepare(config, workdir: Path | None, experiment) -> None:
    from scaling.data import TEXT_DATASETS
    from scaling.data import prepare as prepare_lib

    if config.data.name not in TEXT_DATASETS:
        raise UserError(f"--mode=prepare tokenizes a text corpus; {config.experiment} trains "
                        f"on {config.data.name}, which needs no preparing")
    prepare_lib.prepare(config)
    where = (f" --config.data.prepared_dir={config.data.prepared_dir}"
             if config.data.prepared_dir else "")
    print(f"prepared in {prepare_lib.corpus_root(config)}; train with: python -m scaling.main "
          f"--experiment={FLAGS.experiment}{where}", flush=True)


def run_preflight(config, workdir: Path, experiment) -> None:
    if FLAGS.serve:
        from scaling.engine import EngineOptions
        from scaling.preflight import serve

        given = {name: FLAGS[name].value for name in [*SERVE_FLAGS, "quantize"]
                 if FLAGS[name].value is not None}
        serve.run_serve_preflight(config, FLAGS.topology, workdir, EngineOptions(**given),
                                  FLAGS.context, experiment)
        return
    from scaling.preflight import step_report

    step_report.run_preflight(config, FLAGS.topology, workdir, experiment)


MODES = {
    "train": Mode(run_train, reads_ahead=True, exclusive=True),
    "eval": Mode(run_eval, reads_ahead=True),
    "sample": Mode(run_sample),
    "describe": Mode(None, records_start=False),  # no workdir: see `describe`
    "predict": Mode(run_predict, reads_ahead=True),
    "export": Mode(run_export),
    "import_hf": Mode(run_import_hf, exclusive=True),
    "export_hf": Mode(run_export_hf),
    "preflight": Mode(run_preflight, records_start=False),  # compiles for other hardware
    "prepare": Mode(run_prepare, records_start=False, needs_jax=False),
}


def describe(config, experiment) -> None:
    """`--mode=describe`: every config field with its value and help, then the state table."""
    import jax

    from scaling.config import schema
    from scaling.training import run as run_lib

    num_devices = FLAGS.num_devices or jax.device_count()
    if num_devices < 1:
        raise UserError(f"--num_devices={num_devices}: must be positive")
    print(schema.describe(config, config_lib.has_model_hook(experiment)) + "\n", flush=True)
    print(run_lib.describe(config, num_devices, experiment))


def run(argv: list[str]) -> None:
    # Orbax logs every file it writes at INFO; keep the console for the progress line.
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; overrides are written "
                        "--config.KEY=VALUE")
    if FLAGS.list:
        experiments = config_lib.list_experiments()
        width = max(map(len, experiments), default=0)
        for name, description in experiments.items():
            print(f"{name:<{width}}  {description}")
        return
    mode = MODES.get(FLAGS.mode)
    if mode is None:
        raise UserError(f"--mode={FLAGS.mode}: expected one of {', '.join(MODES)}")
    if FLAGS.mode == "train":
        startup_gc.pause()  # until the first step is reported (scaling/runtime/startup_gc.py)
    config, experiment = config_lib.load_config(FLAGS.experiment, _overrides)
    profiling.parse_steps(FLAGS.profile_steps, FLAGS.mode)  # a bad window fails before work
    if not mode.needs_jax:
        mode.run(config, None, experiment)
        return
    if mode.reads_ahead:
        from scaling.data import read_ahead

        read_ahead(config)  # decompresses while the heavy imports below run
    from scaling.runtime import distributed  # heavy imports once the command line is good

    if FLAGS.mode != "preflight":  # executables for a TPU topology cannot be loaded back here
        compile_cache.enable(FLAGS.compilation_cache_dir)
    setup = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, FLAGS.distributed_timeout)
    if mode.run is None:
        describe(config, experiment)
        return
    workdir = workdir_lib.prepare(FLAGS.workdir, config.experiment)
    with _run_lock(mode, workdir):
        print(f"experiment {config.experiment}, mode {FLAGS.mode}, workdir {workdir}, {setup}",
              flush=True)
        if mode.records_start:
            record_start(config, workdir, experiment)
        mode.run(config, workdir, experiment)


def _run_lock(mode: Mode, workdir: Path):
    """The workdir's run lock for a mode that writes a run's history, held by the first
    process of a multi-process run (the others follow it or fail with it)."""
    import jax

    if mode.exclusive and jax.process_index() == 0:
        return workdir_lib.run_lock(workdir)
    return contextlib.nullcontext()


def record_start(config, workdir: Path, experiment) -> None:
    """Refuse a changed model config before restoring, then record provenance (process 0)."""
    import jax

    from scaling.runtime import provenance

    changes = provenance.check_model_config(workdir, config, FLAGS.allow_config_change)
    if changes:
        print(f"{provenance.ALLOW_FLAG}: restoring despite {len(changes)} model config "
              "changes", flush=True)
    if jax.process_index() != 0:
        return
    devices = {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
               "count": jax.device_count(), "processes": jax.process_count()}
    extra = None
    if FLAGS.mode == "import_hf" and FLAGS.source and Path(FLAGS.source, "config.json").is_file():
        from scaling.inference import hf_checkpoint

        extra = {"import_source": hf_checkpoint.source_record(Path(FLAGS.source))}
    provenance.record(workdir, config, Path(experiment.__file__), FLAGS.mode, devices,
                      config_change_allowed=bool(changes), extra=extra)


def sample_text_from_flags(config, workdir: Path, experiment) -> str:
    from scaling.inference import sample

    defaults = config.sample if "sample" in config else {}  # schema: language models only

    def pick(flag_value, key, fallback):
        return flag_value if flag_value is not None else defaults.get(key, fallback)

    options = sample.SampleOptions(
        prompt=FLAGS.prompt, seed=FLAGS.sample_seed,
        max_new_tokens=pick(FLAGS.max_new_tokens, "max_new_tokens", 200),
        temperature=pick(FLAGS.temperature, "temperature", 1.0),
        top_k=pick(FLAGS.top_k, "top_k", 0), quantize=FLAGS.quantize or "none")
    return sample.sample_from_checkpoint(config, workdir, options, experiment)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def main(argv: list[str]) -> None:
    platforms.skip_absent_tpu()
    exit_on_error(run, argv)


def entry() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
