"""`python -m scaling.serve --workdir=DIR [--port=N]`: serve a language model's checkpoint.

The workdir's `config.json` says which experiment and model it holds (`--experiment` may
name the file when it moved), and `--config.KEY=VALUE` overrides apply as in training; the
mesh flags (`--mesh.tensor=4`, short for `--config.mesh.tensor=4`) split the weights and the
cache over the local devices. The params of the latest checkpoint (or `--checkpoint_step`)
are restored alone, LoRA adapters merged into them, and the tokenizer saved in the workdir
is used, so neither the corpus nor the optimizer is needed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from absl import flags, logging

from scaling.errors import UserError, exit_on_error
from scaling.runtime import platforms
from scaling.serving import protocol

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training or import workdir to serve.",
                    flag_values=FLAGS)
flags.DEFINE_string("experiment", None, "The experiment file, when config.json's name no "
                    "longer finds it.", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_step", None, "The checkpoint to serve (default: the latest).",
                     flag_values=FLAGS)
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the "
                    "experiment's name).", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "The address to listen on.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "The port to listen on; 0 picks a free one.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_num_seqs", 16, "Decode slots: the requests generating at once.",
                     flag_values=FLAGS)
flags.DEFINE_integer("kv_block_size", 16, "Positions per KV cache block.", flag_values=FLAGS)
flags.DEFINE_integer("num_kv_blocks", 0, "Blocks in the KV cache (0: from --kv_cache_gib).",
                     flag_values=FLAGS)
flags.DEFINE_float("kv_cache_gib", 0.0, "The KV cache's size in GiB (0 with --num_kv_blocks=0: "
                   "a full context for every slot).", flag_values=FLAGS)
flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens computed per prefill step; longer "
                     "prompts are prefilled in chunks between decode steps.", flag_values=FLAGS)
flags.DEFINE_integer("max_queue", 1024, "Requests that may wait for a slot; more get 429.",
                     flag_values=FLAGS)
flags.DEFINE_integer("default_max_tokens", 16, "max_tokens of a request that sets none.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_request_bytes", 4 << 20, "Larger request bodies get 413.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_json_depth", 16, "Request bodies nested deeper get 400.",
                     flag_values=FLAGS)
flags.DEFINE_float("body_timeout_s", 30.0, "A body not received within this gets 408.",
                   flag_values=FLAGS)
flags.DEFINE_float("idle_timeout_s", 30.0, "A connection that sends no whole request within "
                   "this is closed.", flag_values=FLAGS)
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache, so a "
                    "restarted server skips its warm-up compiles. Default: $SCALING_CACHE_DIR, "
                    "else ~/.cache/scaling/jax; empty turns it off.", flag_values=FLAGS)
flags.DEFINE_float("shutdown_grace_s", 30.0, "On SIGTERM, the longest the requests in flight "
                   "may hold up the exit.", flag_values=FLAGS)

CONFIG_PREFIX = "--config."
MESH_PREFIX = "--mesh."


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--config.a.b=v` and `--mesh.axis=n` overrides apart from the server's own flags."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith(CONFIG_PREFIX):
            overrides.append(arg[len(CONFIG_PREFIX):])
        elif arg.startswith(MESH_PREFIX):
            overrides.append("mesh." + arg[len(MESH_PREFIX):])
        else:
            rest.append(arg)
    return overrides, rest


def engine_options():
    from scaling.engine import EngineOptions

    return EngineOptions(max_num_seqs=FLAGS.max_num_seqs, kv_block_size=FLAGS.kv_block_size,
                         num_kv_blocks=FLAGS.num_kv_blocks, kv_cache_gib=FLAGS.kv_cache_gib,
                         prefill_chunk=FLAGS.prefill_chunk, max_queue=FLAGS.max_queue)


def load_service(workdir: Path, experiment: str | None, overrides: list[str],
                 checkpoint_step: int | None, options, served_model_name: str | None = None,
                 default_max_tokens: int = 16):
    """The workdir's model restored on its mesh, compiled into an engine, behind a service."""
    from scaling.config import experiments as config_lib
    from scaling.data.tokenizer import TOKENIZER_DIR
    from scaling.engine import make_engine
    from scaling.inference import restore
    from scaling.inference.sample import workdir_tokenizer
    from scaling.models import lora
    from scaling.runtime import provenance
    from scaling.serving.chat import ChatTemplate
    from scaling.serving.lm_server import LanguageModelService

    if not Path(workdir).is_dir():
        raise UserError(f"--workdir={workdir}: no such directory")
    config, module = config_lib.load_recorded_config(workdir, experiment, overrides)
    if config.task not in ("language_modeling", "sft"):
        raise UserError(f"--workdir={workdir}: holds a {config.task} model; serve a "
                        "classifier's export with --artifact=DIR")
    provenance.check_model_config(Path(workdir), config, False)
    tokenizer = workdir_tokenizer(config, Path(workdir))
    restored = restore.load(config, Path(workdir), checkpoint_step, experiment=module)
    params = restored.params
    model_config = restored.model.config
    if model_config.lora_rank:
        params = lora.merged(params, model_config.lora_rank, model_config.lora_alpha)
    engine = make_engine(restored.model, params, restored.mesh, restored.rules, tokenizer,
                         options)
    chat = ChatTemplate(Path(workdir) / TOKENIZER_DIR)
    return LanguageModelService(engine, served_model_name or config.experiment, chat,
                                default_max_tokens)


def run(argv: list[str]) -> None:
    overrides, argv = split_overrides(argv)
    protocol.parse_command_line(FLAGS, argv)
    if not FLAGS.workdir:
        raise UserError("--workdir is required: the training or import workdir to serve")
    protocol.check_port(FLAGS.port)
    protocol.check_minimums(FLAGS, (("default_max_tokens", 1), *protocol.LIMIT_MINIMUMS))
    from scaling.runtime import compile_cache
    from scaling.serving import lm_server
    from scaling.serving.server import Limits

    compile_cache.enable(FLAGS.compilation_cache_dir)

    service = load_service(Path(FLAGS.workdir), FLAGS.experiment, overrides,
                           FLAGS.checkpoint_step, engine_options(), FLAGS.served_model_name,
                           FLAGS.default_max_tokens)
    limits = Limits(FLAGS.max_request_bytes, FLAGS.max_json_depth, FLAGS.body_timeout_s)
    asyncio.run(lm_server.serve(service, FLAGS.host, FLAGS.port, limits, FLAGS.idle_timeout_s,
                                FLAGS.shutdown_grace_s))


def entry(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print("python -m scaling.serve --workdir=DIR [--config.KEY=VALUE ...] [flags]\n\n"
              f"{FLAGS.get_help()}")
        return
    platforms.skip_absent_tpu()
    logging.set_verbosity(logging.WARNING)
    exit_on_error(run, argv)
