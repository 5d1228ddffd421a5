"""Command line: `python -m scaling.main --experiment=NAME_OR_PATH [--config.KEY=VALUE ...]`.

The only module that defines flags. It parses them, loads the experiment, prepares the workdir
and dispatches a mode. Every user mistake ends here as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from absl import app, flags, logging

from scaling import config as config_lib
from scaling.errors import TrainingDiverged, UserError
from scaling.preemption import EXIT_PREEMPTED, Preempted

MODES = ("train", "eval", "sample", "describe")

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None,
                    "Experiment name (experiments/NAME.py) or path to an experiment .py file.")
flags.DEFINE_string("workdir", None,
                    "Directory for config.json, metrics.jsonl, checkpoints and TensorBoard "
                    "events. Default: runs/EXPERIMENT under the current directory.")
flags.DEFINE_string("mode", "train", f"One of: {', '.join(MODES)}.")
flags.DEFINE_string("prompt", "\n", "--mode=sample: the text to continue.")
flags.DEFINE_integer("max_new_tokens", None, "--mode=sample: tokens to generate "
                     "(default: config.sample.max_new_tokens).")
flags.DEFINE_float("temperature", None, "--mode=sample: softmax temperature, 0 for greedy "
                   "(default: config.sample.temperature).")
flags.DEFINE_integer("top_k", None, "--mode=sample: keep the k most likely tokens, 0 for all "
                     "(default: config.sample.top_k).")
flags.DEFINE_integer("sample_seed", 0, "--mode=sample: the seed; equal seeds give equal text.")
flags.DEFINE_integer("num_devices", None, "--mode=describe: size the mesh for this many "
                     "devices instead of the local ones.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0. "
                    "Not needed on TPU pods or under SLURM, where it is detected.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id, from 0.")
flags.DEFINE_integer("distributed_timeout", 120, "Multi-process: seconds to wait for the "
                     "others at start-up, and before a lost process fails the rest.")
flags.DEFINE_bool("list", False, "List the experiments with their descriptions, then exit.")

CONFIG_PREFIX = "--config."
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.a.b=value` overrides from the flags absl knows."""
    overrides, rest = [], []
    for arg in argv:
        (overrides.append(arg[len(CONFIG_PREFIX):]) if arg.startswith(CONFIG_PREFIX)
         else rest.append(arg))
    return overrides, rest


_overrides: list[str] = []


def parse_flags(argv: list[str]) -> list[str]:
    overrides, rest = split_config_args(argv)
    _overrides[:] = overrides
    try:
        return FLAGS(rest)
    except flags.Error as e:
        _fail(str(e))


def prepare_workdir(workdir: str | None, experiment: str) -> Path:
    """The resolved workdir, created and proven writable before any heavy work."""
    path = Path(workdir if workdir else Path("runs") / experiment).expanduser().resolve()
    flag = f"--workdir={workdir}" if workdir else f"the default workdir {path}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{flag}: cannot write there ({e.strerror}); choose a writable "
                        "directory with --workdir") from None
    return path


def write_config(config, workdir: Path) -> None:
    target = workdir / "config.json"
    partial = workdir / "config.json.tmp"
    partial.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    partial.replace(target)


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
    if FLAGS.mode not in MODES:
        raise UserError(f"--mode={FLAGS.mode}: expected one of {', '.join(MODES)}")
    config, experiment = config_lib.load_config(FLAGS.experiment, _overrides)
    from scaling import distributed, train  # heavy imports once the command line is good

    setup = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, FLAGS.distributed_timeout)

    if FLAGS.mode == "describe":
        import jax

        num_devices = FLAGS.num_devices or jax.device_count()
        if num_devices < 1:
            raise UserError(f"--num_devices={num_devices}: must be positive")
        print(train.describe(config, num_devices, experiment))
        return
    workdir = prepare_workdir(FLAGS.workdir, config.experiment)
    print(f"experiment {config.experiment}, mode {FLAGS.mode}, workdir {workdir}, {setup}",
          flush=True)
    if FLAGS.mode == "train":
        import jax

        if jax.process_index() == 0:
            write_config(config, workdir)
        train.train_and_evaluate(config, workdir, experiment)
    elif FLAGS.mode == "eval":
        results = train.evaluate_checkpoint(config, workdir, experiment)
        for split, values in results.items():
            print(f"{split} {train.format_metrics(values)}")
    elif FLAGS.mode == "sample":
        print(sample_text_from_flags(config, workdir, experiment), flush=True)


def sample_text_from_flags(config, workdir: Path, experiment) -> str:
    from scaling import sample

    defaults = config.get("sample") or {}

    def pick(flag_value, key, fallback):
        return flag_value if flag_value is not None else defaults.get(key, fallback)

    options = sample.SampleOptions(
        prompt=FLAGS.prompt, seed=FLAGS.sample_seed,
        max_new_tokens=pick(FLAGS.max_new_tokens, "max_new_tokens", 200),
        temperature=pick(FLAGS.temperature, "temperature", 1.0),
        top_k=pick(FLAGS.top_k, "top_k", 0))
    return sample.sample_from_checkpoint(config, workdir, options, experiment)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def main(argv: list[str]) -> None:
    try:
        run(argv)
    except UserError as e:
        _fail(str(e))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)


def entry() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
