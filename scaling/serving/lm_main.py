"""`python -m scaling.serve --workdir=DIR | --model=DIR [--port=N]`: serve a language model.

`--workdir=DIR` serves a training or import workdir: its `config.json` says which experiment
and model it holds (`--experiment` may name the file when it moved), and
`--config.KEY=VALUE` overrides apply as in training. The params of the latest checkpoint (or
`--checkpoint_step`) are restored alone, LoRA adapters merged into them, and the tokenizer
saved in the workdir is used, so neither the corpus nor the optimizer is needed.

`--model=DIR` serves a Hugging Face directory as it is (what `--mode=export_hf` writes, or a
Hub download): the architecture from its `config.json`, the weights from its safetensors,
in float32 unless `--dtype=bfloat16`, and the clients' model name is the `--model` string as
given, as vLLM names it.

Either way the mesh flags (`--mesh.tensor=4`, short for `--config.mesh.tensor=4`) split the
weights and the cache over the local devices, and the chat template and generation settings
(`scaling.interop.hf_generation`: stop ids, request defaults) come from the model's files:
`WORKDIR/tokenizer/`, where the import keeps them, or the directory itself.

`--quantize=int8` holds every kernel as int8 with a scale per output channel, quantized once
after loading and split as the float kernel was (`scaling.engine.quantize`); the bytes held
are printed at start-up and published as `scaling_weight_bytes` in `/metrics`.

The engine's flags are made from the fields of `scaling.engine.EngineOptions`, each with its
help text in `ENGINE_FLAG_HELP`, so a new engine option is a new flag with no second list.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import types
import typing
import urllib.parse
from pathlib import Path

from absl import flags, logging

from scaling.config import experiments as config_lib
from scaling.engine import EngineOptions, check_options
from scaling.errors import UserError, exit_on_error
from scaling.runtime import platforms
from scaling.serving import protocol

# The help of each EngineOptions field's flag (its name, type and default come from the
# dataclass); a field without one here fails tests/test_serve_hf_dir.py.
ENGINE_FLAG_HELP = {
    "max_num_seqs": "Decode slots: the requests generating at once.",
    "kv_block_size": "Positions per KV cache block.",
    "num_kv_blocks": "Blocks in the KV cache (0: from --kv_cache_gib).",
    "kv_cache_gib": "The KV cache's size in GiB (0 with --num_kv_blocks=0: a full context for "
                    "every slot).",
    "prefill_chunk": "Prompt tokens computed per prefill step; longer prompts are prefilled in "
                     "chunks between decode steps.",
    "max_queue": "Requests that may wait for a slot; more get 429.",
    "kv_cache_dtype": "How the KV cache stores keys and values: auto (the model's compute "
                      "dtype) or int8 (scaled int8: about half the bytes of bfloat16, so "
                      "twice the cached tokens).",
    "quantize": "How the weights are held: none (as loaded) or int8 (every kernel of "
                "attention, MLP, embedding and output projection as int8 with a scale per "
                "output channel, quantized once at load: about a quarter of float32's bytes).",
}

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training or import workdir to serve.",
                    flag_values=FLAGS)
flags.DEFINE_string("experiment", None, "The experiment file, when config.json's name no "
                    "longer finds it.", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_step", None, "The checkpoint to serve (default: the latest).",
                     flag_values=FLAGS)
flags.DEFINE_string("model", None, "A Hugging Face model directory to serve as it is "
                    "(config.json, *.safetensors, tokenizer.json), instead of --workdir.",
                    flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "--model: the weights' and "
                  "activations' dtype (default: float32).", flag_values=FLAGS)
flags.DEFINE_integer("max_model_len", None, "--model: the longest prompt and reply served, "
                     "and so each slot's KV cache (default: config.json's "
                     "max_position_embeddings).", flag_values=FLAGS)
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the "
                    "experiment's name, or the --model string as given).", flag_values=FLAGS)
flags.DEFINE_string("generation_config", "auto", "Where the stop ids and the defaults of "
                    "unset request fields (temperature, top_p, top_k, min_p, "
                    "repetition_penalty, max_tokens) come from, as in vLLM: auto, the model's "
                    "generation_config.json (else its config.json); vllm, the stop ids alone; "
                    "or a directory holding a generation_config.json.", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "The address to listen on.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "The port to listen on; 0 picks a free one.",
                     flag_values=FLAGS)


def _define_engine_flags() -> None:
    """One flag per EngineOptions field: its name, type and default."""
    define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string}
    hints = typing.get_type_hints(EngineOptions)
    for field in dataclasses.fields(EngineOptions):
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind not in define:
            raise TypeError(f"EngineOptions.{field.name}: {kind} has no flag type")
        define[kind](field.name, field.default,
                     ENGINE_FLAG_HELP.get(field.name, f"EngineOptions.{field.name}."),
                     flag_values=FLAGS)


_define_engine_flags()
flags.DEFINE_string("allowed_origins", None, "Comma-separated origins whose browser pages may "
                    "call the API (CORS), e.g. http://localhost:3000; * allows any. Default: "
                    "none.", flag_values=FLAGS)
flags.DEFINE_integer("default_max_tokens", 16, "max_tokens of a request that sets none (the "
                     "model's generation_config.json max_new_tokens, when it has one, comes "
                     "first).", flag_values=FLAGS)
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

def engine_options() -> EngineOptions:
    return EngineOptions(**{field.name: FLAGS[field.name].value
                            for field in dataclasses.fields(EngineOptions)})


def parse_origins(value: str | None) -> tuple[str, ...]:
    """`--allowed_origins`: `*`, or origins as browsers send them (scheme://host[:port])."""
    origins = tuple(o.strip().rstrip("/") for o in (value or "").split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
                or parts.query or parts.fragment or parts.username:
            raise UserError(f"--allowed_origins: {origin!r} is not an origin; write "
                            "scheme://host[:port] (e.g. http://localhost:3000), or * for any")
    return origins


def _model_files(settings_dir: Path, tokenizer, generation_config: str = "auto"):
    """The generation settings and chat template of the model's files in `settings_dir`,
    read before any weight so a mistake in them costs no loading time. As vLLM's
    `--generation-config`: `vllm` keeps the stop ids but none of the request defaults, and a
    directory replaces the model's settings with its own."""
    from scaling.interop.hf_generation import read_generation_settings
    from scaling.serving.chat import ChatTemplate

    source = settings_dir
    if generation_config not in ("auto", "vllm"):
        source = Path(generation_config)
        if not source.is_dir():
            raise UserError(f"--generation_config={generation_config}: expected auto, vllm, "
                            "or a directory holding a generation_config.json")
    settings = read_generation_settings(source, tokenizer)
    if generation_config == "vllm":
        settings = dataclasses.replace(settings, defaults={})
    return settings, ChatTemplate(settings_dir)


def _service(model_parts: tuple, tokenizer, model_files: tuple, name: str,
             options: EngineOptions, default_max_tokens: int):
    """The engine over a loaded model (model, params, mesh, rules), stopping on the settings'
    ids, behind the service that applies their request defaults."""
    from scaling.engine import make_engine, quantize
    from scaling.serving.lm_server import LanguageModelService

    settings, chat = model_files
    loaded_bytes = quantize.weight_bytes(model_parts[1])
    engine = make_engine(*model_parts, tokenizer, options, stop_ids=settings.stop_ids)
    print(quantize.describe(options.quantize, engine.programs.weight_bytes, loaded_bytes),
          flush=True)
    return LanguageModelService(engine, name, chat, default_max_tokens,
                                sampling_defaults=settings.defaults)


def load_service(workdir: Path, experiment: str | None, overrides: list[str],
                 checkpoint_step: int | None, options: EngineOptions,
                 served_model_name: str | None = None, default_max_tokens: int = 16,
                 generation_config: str = "auto"):
    """The workdir's model restored on its mesh, compiled into an engine, behind a service."""
    from scaling.data import workdir_tokenizer
    from scaling.data.tokenizer import TOKENIZER_DIR
    from scaling.inference import restore
    from scaling.models import lora
    from scaling.runtime import provenance

    if not Path(workdir).is_dir():
        raise UserError(f"--workdir={workdir}: no such directory")
    config, module = config_lib.load_recorded_config(workdir, experiment, overrides)
    if config.task not in ("language_modeling", "sft"):
        raise UserError(f"--workdir={workdir}: holds a {config.task} model; serve a "
                        "classifier's export with --artifact=DIR")
    provenance.check_model_config(Path(workdir), config, False)
    tokenizer = workdir_tokenizer(config, Path(workdir))
    model_files = _model_files(Path(workdir) / TOKENIZER_DIR, tokenizer, generation_config)
    restored = restore.load(config, Path(workdir), checkpoint_step, experiment=module)
    params = restored.params
    model_config = restored.model.config
    if model_config.lora_rank:
        params = lora.merged(params, model_config.lora_rank, model_config.lora_alpha)
    return _service((restored.model, params, restored.mesh, restored.rules), tokenizer,
                    model_files, served_model_name or config.experiment, options,
                    default_max_tokens)


def hf_directory_config(directory: Path, overrides: list[str], dtype: str = "float32",
                        max_model_len: int | None = None):
    """The resolved config of a Hugging Face directory: its architecture over the schema's
    defaults, then the `--config.` and `--mesh.` overrides, checked as an experiment's."""
    from scaling.inference import hf_model

    given = hf_model.literal_config(directory, dtype, max_model_len)
    return config_lib.resolve_literal(given, f"--model={directory}",
                                      Path(directory).resolve().name, overrides)


def load_hf_service(directory: Path, overrides: list[str], options: EngineOptions,
                    served_model_name: str, default_max_tokens: int = 16,
                    dtype: str = "float32", max_model_len: int | None = None,
                    generation_config: str = "auto"):
    """A Hugging Face directory's model read onto the mesh, compiled, behind a service."""
    from scaling.inference import hf_model

    config = hf_directory_config(directory, overrides, dtype, max_model_len)
    tokenizer = hf_model.load_tokenizer(config)
    model_files = _model_files(Path(directory), tokenizer, generation_config)
    loaded = hf_model.load(directory, config)
    return _service((loaded.model, loaded.params, loaded.mesh, loaded.rules), tokenizer,
                    model_files, served_model_name, options, default_max_tokens)


def check_sources() -> None:
    """Exactly one model source: a workdir (with its own flags) or a Hugging Face directory."""
    if FLAGS.model is not None:
        given = [f"--{name}" for name in ("workdir", "experiment", "checkpoint_step")
                 if FLAGS[name].value is not None]
        if given:
            raise UserError(f"--model={FLAGS.model} serves a Hugging Face directory as it is "
                            f"and takes no {' or '.join(given)}; pass either --model=DIR or "
                            "--workdir=DIR")
        if not FLAGS.model:
            raise UserError("--model= is empty; pass a Hugging Face model directory")
        return
    if not FLAGS.workdir:
        raise UserError("--workdir=DIR or --model=DIR is required: a training or import "
                        "workdir, or a Hugging Face model directory, to serve")
    for name in ("dtype", "max_model_len"):
        if FLAGS[name].value is not None:
            raise UserError(f"--{name} applies to --model=DIR only; a workdir serves its "
                            f"config's model (override it with --config.model.* instead)")


def run(argv: list[str]) -> None:
    overrides, argv = config_lib.split_overrides(argv)
    protocol.parse_command_line(FLAGS, argv)
    check_sources()
    protocol.check_port(FLAGS.port)
    protocol.check_minimums(FLAGS, (("default_max_tokens", 1), *protocol.LIMIT_MINIMUMS))
    origins = parse_origins(FLAGS.allowed_origins)
    options = engine_options()
    check_options(options)
    from scaling.runtime import compile_cache
    from scaling.serving import lm_server

    compile_cache.enable(FLAGS.compilation_cache_dir)
    sock = protocol.reserve(FLAGS.host, FLAGS.port)
    print(f"listening on http://{FLAGS.host}:{sock.getsockname()[1]}/v1; loading the model, "
          "then compiling: requests wait until it serves", flush=True)

    if FLAGS.model is not None:
        service = load_hf_service(Path(FLAGS.model), overrides, options,
                                  FLAGS.served_model_name or FLAGS.model,
                                  FLAGS.default_max_tokens, FLAGS.dtype or "float32",
                                  FLAGS.max_model_len, FLAGS.generation_config)
    else:
        service = load_service(Path(FLAGS.workdir), FLAGS.experiment, overrides,
                               FLAGS.checkpoint_step, options,
                               FLAGS.served_model_name, FLAGS.default_max_tokens,
                               FLAGS.generation_config)
    limits = protocol.Limits(FLAGS.max_request_bytes, FLAGS.max_json_depth, FLAGS.body_timeout_s)
    asyncio.run(lm_server.serve(service, FLAGS.host, FLAGS.port, limits, FLAGS.idle_timeout_s,
                                FLAGS.shutdown_grace_s, allowed_origins=origins, sock=sock))


def entry(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print("python -m scaling.serve --workdir=DIR | --model=DIR [--config.KEY=VALUE ...] "
              f"[flags]\n\n{FLAGS.get_help()}")
        return
    platforms.skip_absent_tpu()
    logging.set_verbosity(logging.WARNING)
    exit_on_error(run, argv)
