"""The config schema: every field once, with its type, default, allowed values and help.

An experiment's `get_config()` states only what defines the experiment; `resolve` fills the
rest from here, so a default lives in one place instead of in every experiment file and in
`config.get(key, default)` calls scattered through the trainer. Each field is a `Field`:
dotted key, type, default (or `REQUIRED`: the experiment must state it), the allowed values
or a lower bound, and a one-line help that `--mode=describe` prints.

Which fields exist depends on the kind of experiment, named by three selectors in the
experiment file:

- `model.name` picks a row of `MODEL_FIELDS` (`mlp`, `transformer`; the transformer's fields
  mirror `scaling.models.transformer.TransformerConfig`, names and defaults, which a test
  holds equal);
- `data.name` picks image or text fields (`DATA_FIELDS`, by `DATA_KINDS`): text adds the
  tokenizer, window length and evaluation splits;
- `task` adds `sample.*` for language models (`TASK_FIELDS`).

The selectors are read from the experiment file; an override that would change the set of
fields (say `--config.model.name=transformer` on an MLP experiment) is refused, since the
new kind's required fields would have no values: write an experiment file for it.

Experiments with their own model (`make_model(config)` in the file) may name any model and
carry model fields the schema does not know: the trainer never reads `config.model` for
them, only their hook does, so the schema cannot say what is a typo there. Such fields take
the type of the value the file gives (overrides parse to it) and are listed by describe as
the experiment's own. If the hook experiment names a built-in model, that model's fields
are still filled and checked. Outside `model`, hook experiments get the same checks as any.

Nothing here imports JAX, so a bad config fails before the heavy imports start.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from scaling.data import IMAGE_DATASETS, SFT_DATASETS, TEXT_DATASETS
from scaling.data.packed_windows import PACKINGS
from scaling.data.tokenizer import TOKENIZERS
from scaling.errors import UserError
from scaling.sharding import MESH_AXES


class _Required:
    """The default of a field that every experiment must state (no value would be sane)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number",
              str: "a string", tuple: "a tuple", dict: "a mapping"}


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field. `type` is bool, int, float, str, tuple (any sequence, stored as a
    tuple) or dict (a free-form mapping, such as per-platform XLA options)."""

    key: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None         # a strict lower bound (a rate, a base)
    items_minimum: int | None = None   # tuple fields of integers (widths): each at least this

    def coerce(self, value: Any, where: str) -> Any:
        """`value` as this field's type, or a UserError naming `where` the value came from."""
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              tuple: lambda v: isinstance(v, (tuple, list)),
              dict: lambda v: isinstance(v, Mapping)}[self.type]
        if not ok(value):
            raise UserError(f"--config.{self.key}={show(value)}{where}: expected "
                            f"{TYPE_NAMES[self.type]}")
        if self.type is float:
            return float(value)
        if self.type is tuple:
            return _as_tuples(value)
        return value

    def problem(self, value: Any) -> str | None:
        """What is wrong with a value of the right type, as the end of a message; or None."""
        if self.choices is not None and value not in self.choices:
            return f"expected one of {', '.join(map(str, self.choices))}"
        if self.type is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            return "must be a finite number (within float32's range, which computes it)"
        if self.type is int and abs(value) > MAX_INT:
            return f"must lie within ±{MAX_INT:,}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.above is not None and not value > self.above:
            return f"must be greater than {self.above:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}"
        if self.items_minimum is not None and not all(
                isinstance(v, int) and not isinstance(v, bool)
                and self.items_minimum <= v <= MAX_INT for v in value):
            return f"expected integers of at least {self.items_minimum}"
        return None


# Sizes past this are typos (an extra digit, a wrong unit); refusing them here keeps them from
# overflowing in numpy or XLA later. Memory checks refuse smaller impossible sizes.
MAX_INT = 2**40
FLOAT32_MAX = 3.4e38


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def show(value: Any) -> str:
    """A value as messages and describe print it: strings quoted, so '' stays visible."""
    if isinstance(value, str):
        return repr(value)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return json.dumps(_plain(value), sort_keys=True)
    return str(value)


def _plain_tree(config: Any) -> dict:
    """A ConfigDict (not a Mapping) as nested dicts, so one walker serves both."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


DTYPES = ("float32", "bfloat16", "float16")

# Every logical axis name the built-in models use (scaling.models.axes), mapped onto the
# mesh: batches over data x fsdp, the sequence of activations over context, weights' embed
# axis split by FSDP, heads, MLP units and vocabulary by tensor parallelism; the rest
# replicated.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "context"),
    ("embed", "fsdp"),
    ("residual", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("classes", None),
)

COMMON_FIELDS = (
    Field("experiment", str, "", "the experiment file's name; set when the file is loaded"),
    Field("seed", int, 0, "seeds parameter init and the data order", minimum=0,
          maximum=2**32 - 1),
    Field("task", str, REQUIRED, "the loss and metrics; sft: a language model's loss on "
          "response tokens only, with exact-match accuracy",
          choices=("classification", "language_modeling", "sft")),
    Field("data.name", str, REQUIRED, "the dataset",
          choices=IMAGE_DATASETS + TEXT_DATASETS + SFT_DATASETS),
    Field("data.manual_dir", str, "", "a local folder holding the dataset's source files "
          "(the four IDX .gz files, or input.txt); empty: TFDS"),
    Field("data.tfds_data_dir", str, "", "a TFDS data directory, local or gs://; empty: "
          "$TFDS_DATA_DIR or ~/tensorflow_datasets"),
    Field("data.prefetch_steps", int, 4, "text corpora: training steps each process reads "
          "ahead on background threads; 0 reads in the loop", minimum=0),
    Field("init_from", str, "", "a fresh run's params: a Hugging Face model directory or "
          "another workdir (its latest checkpoint); the optimizer starts fresh at step 0"),
    Field("model.name", str, REQUIRED, "the model; any name if the experiment defines "
          "make_model(config)", choices=("mlp", "transformer")),
    Field("optimizer.name", str, "adam", "the update rule", choices=("adam", "adamw", "sgd")),
    Field("optimizer.learning_rate", float, 1e-3, "the peak learning rate", minimum=0),
    Field("optimizer.schedule", str, "constant", "the learning-rate schedule",
          choices=("constant", "warmup_cosine")),
    Field("optimizer.warmup_steps", int, 0, "warmup_cosine: steps of linear warmup", minimum=0),
    Field("optimizer.final_lr_fraction", float, 0.0, "warmup_cosine: the final learning rate "
          "as a fraction of the peak", minimum=0),
    Field("optimizer.b1", float, 0.9, "adam, adamw: decay of the first moment", minimum=0,
          maximum=1),
    Field("optimizer.b2", float, 0.999, "adam, adamw: decay of the second moment", minimum=0,
          maximum=1),
    Field("optimizer.eps", float, 1e-8, "adam, adamw: added to the root of the second moment "
          "(Keras uses 1e-7)"),
    Field("optimizer.weight_decay", float, 0.0, "adamw: decoupled weight decay (never on "
          "biases or norm scales)", minimum=0),
    Field("optimizer.momentum", float, 0.9, "sgd: momentum; 0 disables it", minimum=0),
    Field("optimizer.nesterov", bool, False, "sgd: Nesterov momentum"),
    Field("optimizer.clip_norm", float, 0.0, "global-norm gradient clipping; 0 disables it",
          minimum=0),
    Field("nan_policy", str, "abort", "on a non-finite loss or gradient: abort the run, or "
          "skip the update", choices=("abort", "skip")),
    Field("l2", float, 0.0, "λ of the loss term λ/2·Σw² over weight matrices", minimum=0),
    Field("batch_size", int, 128, "examples (sequences) in a global training batch"),
    Field("grad_accum_steps", int, 1, "microbatches per step: the same update in less memory"),
    Field("eval_batch_size", int, 1000, "examples in a global evaluation batch"),
    Field("num_epochs", int, 1, "passes over the training split, unless num_steps > 0"),
    Field("num_steps", int, -1, "training steps; -1 uses num_epochs"),
    Field("steps_per_call", int, 1, "training steps per compiled call"),
    Field("log_every_steps", int, 100, "steps between training metrics"),
    Field("eval_every_steps", int, -1, "steps between evaluations; -1: once per epoch"),
    Field("checkpoint_every_steps", int, 1000, "steps between checkpoints; -1: once per "
          "epoch; the last step is always saved"),
    Field("keep_checkpoints", int, 3, "checkpoints kept in the workdir"),
    Field("xla_options", dict, {}, "XLA compiler options for the train and eval steps, per "
          "platform: {platform: {option: value}}"),
    *(Field(f"mesh.{axis}", int, -1 if axis == "data" else 1,
            f"devices along the {axis} mesh axis within a slice; -1: all remaining")
      for axis in MESH_AXES),
    *(Field(f"mesh.dcn_{axis}", int, 1, f"slices along the {axis} axis (multi-slice over "
            "DCN); the axis is ICI size x DCN size") for axis in MESH_AXES),
    Field("sharding_rules", tuple, DEFAULT_SHARDING_RULES, "(logical axis, mesh axes or None) "
          "pairs; the first rule naming an axis wins"),
)

MODEL_FIELDS = {
    "mlp": (
        Field("model.hidden_sizes", tuple, REQUIRED, "widths of the relu hidden layers",
              items_minimum=1),
        Field("model.num_classes", int, REQUIRED, "width of the output layer", minimum=1),
        Field("model.dtype", str, "float32", "compute dtype (params stay float32)",
              choices=DTYPES),
    ),
    "transformer": (
        Field("model.vocab_size", int, REQUIRED, "embedding rows; at least the tokenizer's "
              "vocabulary, a multiple of the tensor size", minimum=1),
        Field("model.num_layers", int, REQUIRED, "decoder blocks", minimum=1),
        Field("model.embed_dim", int, REQUIRED, "width of the residual stream", minimum=1),
        Field("model.num_heads", int, REQUIRED, "query heads", minimum=1),
        Field("model.num_kv_heads", int, REQUIRED, "key/value heads; divides num_heads",
              minimum=1),
        Field("model.head_dim", int, REQUIRED, "width of one head; even, for rotary "
              "embeddings", minimum=2),
        Field("model.mlp_dim", int, REQUIRED, "hidden width of the SwiGLU MLP", minimum=1),
        Field("model.max_seq_len", int, REQUIRED, "longest sequence, and the KV cache "
              "length when sampling", minimum=1),
        Field("model.rope_theta", float, 10_000.0, "base of the rotary embedding "
              "frequencies", above=1),
        Field("model.rope_scaling", str, "none", "how RoPE is stretched past the context "
              "first trained at: none, or llama3 (Llama 3.1 and 3.2)",
              choices=("none", "llama3")),
        Field("model.rope_scaling_factor", float, 8.0, "llama3 scaling: how many times slower "
              "the low frequencies turn", minimum=0),
        Field("model.rope_low_freq_factor", float, 1.0, "llama3 scaling: wavelengths past "
              "rope_original_max_len / this are slowed", minimum=0),
        Field("model.rope_high_freq_factor", float, 4.0, "llama3 scaling: wavelengths under "
              "rope_original_max_len / this are kept", minimum=0),
        Field("model.rope_original_max_len", int, 8192, "llama3 scaling: the context length "
              "the model was first trained at", minimum=1),
        Field("model.qkv_bias", bool, False, "biases on the query, key and value projections "
              "(Qwen2)"),
        Field("model.tie_embeddings", bool, True, "reuse the token embedding as the output "
              "layer"),
        Field("model.lora_rank", int, 0, "LoRA: the rank of adapters beside every attention "
              "and MLP kernel; only they are trained (0: every param trains)", minimum=0),
        Field("model.lora_alpha", float, 16.0, "LoRA: the adapters' output is scaled by "
              "lora_alpha / lora_rank", minimum=0),
        Field("model.dtype", str, "float32", "compute dtype of matmuls and activations",
              choices=DTYPES),
        Field("model.param_dtype", str, "float32", "storage dtype of the parameters",
              choices=DTYPES),
        Field("model.remat_policy", str, "none", "what each layer saves for the backward "
              "pass; the rest is recomputed",
              choices=("none", "full", "dots", "dots_with_no_batch_dims")),
        Field("model.norm_eps", float, 1e-6, "epsilon of RMSNorm", minimum=0),
        Field("model.scan_layers", bool, True, "stack the layers with nn.scan (compile time "
              "independent of depth)"),
        Field("model.scan_unroll", int, 1, "layers per scanned loop iteration; num_layers "
              "drops the loop", minimum=1),
        Field("model.loss_chunk", int, 0, "positions per chunk of the tiled output projection "
              "and loss (never the whole float32 logits); 0: dense logits", minimum=0),
        Field("model.query_chunk", int, 0, "queries per block of grouped_einsum attention "
              "(its float32 scores made one block at a time, forward and backward); 0: all",
              minimum=0),
        Field("model.splash_block", int, 0, "positions per square block of the splash kernel "
              "(a multiple of 128); 0: the largest of 512, 256, 128 that fits", minimum=0),
        Field("model.attention", str, "auto", "how attention is computed: auto (the splash "
              "kernel on TPU, cuDNN's on GPU in bfloat16, grouped_einsum elsewhere), "
              "grouped_einsum, batched_matmul (faster on a CPU), splash (TPU), cudnn (GPU)",
              choices=("auto", "grouped_einsum", "batched_matmul", "splash", "cudnn")),
    ),
}

DATA_KINDS = {**{name: "image" for name in IMAGE_DATASETS},
              **{name: "text" for name in TEXT_DATASETS},
              **{name: "sft" for name in SFT_DATASETS}}

TOKEN_FIELDS = (
    Field("data.tokenizer", str, "char", "how text becomes tokens", choices=TOKENIZERS),
    Field("data.tokenizer_model", str, "", "sentencepiece: the .model file; "
          "huggingface: the tokenizer.json file"),
    Field("data.seq_len", int, REQUIRED, "tokens in a training window", minimum=1),
)

DATA_FIELDS = {
    "image": (),
    "sft": (
        *TOKEN_FIELDS,
        Field("data.sft_source", str, REQUIRED, "the pairs: jsonl:GLOB (JSON Lines), or "
              "synthetic:add or synthetic:reverse (generated from the seed)"),
        Field("data.prompt_field", str, "prompt", "jsonl: the field holding the prompt"),
        Field("data.response_field", str, "response", "jsonl: the field holding the "
              "response, the only tokens the loss counts"),
        Field("data.validation_fraction", float, 0.05, "the share of pairs (by a hash of "
              "their prompt) held out as the validation split", minimum=0),
        Field("data.on_malformed", str, "error", "a malformed line: stop with its file and "
              "line, or count and skip it", choices=("error", "skip")),
        Field("data.synthetic_examples", int, 20000, "synthetic: pairs generated", minimum=1),
    ),
    "text": (
        *TOKEN_FIELDS,
        Field("data.eval_splits", tuple, ("validation",), "splits evaluated, every token "
              "once"),
        Field("data.eval_max_windows", int, 0, "windows evaluated per split; 0: all",
              minimum=0),
        Field("data.sources", tuple, (), "corpus: KIND:ARGUMENT[@WEIGHT] each, KIND one of "
              "text, jsonl, parquet (a glob), tfds (a name), tiny_shakespeare"),
        Field("data.prepared_dir", str, "", "where --mode=prepare writes the tokenized "
              "shards; empty: $SCALING_DATA_DIR/EXPERIMENT (~/.cache/scaling/corpora)"),
        Field("data.packing", str, "documents", "documents: windows mask attention across "
              "documents and restart positions; concat: plain token runs",
              choices=PACKINGS),
        Field("data.text_field", str, "text", "jsonl, parquet, tfds: the field holding the "
              "text"),
        Field("data.validation_fraction", float, 0.01, "file sources: the share of documents "
              "(by a hash of their text) held out as the validation split", minimum=0),
        Field("data.on_malformed", str, "error", "a malformed record (bad JSON, no text "
              "field, not UTF-8): stop with its file and line, or count and skip it",
              choices=("error", "skip")),
        Field("data.prepare_workers", int, 2, "processes that tokenize in --mode=prepare",
              minimum=1),
        Field("data.prepare_if_missing", bool, False, "prepare the corpus at the start of "
              "training when it is not prepared (small corpora)"),
        Field("data.sentencepiece_vocab_size", int, 32000, "sentencepiece without "
              "tokenizer_model: pieces of the model prepare trains on the corpus", minimum=8),
    ),
}

TASK_FIELDS = {
    "classification": (),
    "language_modeling": (
        Field("sample.max_new_tokens", int, 200, "--mode=sample: tokens to generate",
              minimum=0),
        Field("sample.temperature", float, 1.0, "--mode=sample: softmax temperature; 0 is "
              "greedy", minimum=0),
        Field("sample.top_k", int, 0, "--mode=sample: keep the k most likely tokens; 0 keeps "
              "all", minimum=0),
    ),
}

TASK_FIELDS["sft"] = TASK_FIELDS["language_modeling"]  # both sample from the model

SELECTORS = ("model.name", "data.name", "task")


def _get(tree: Mapping, key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def fields_for(tree: Mapping, has_model_hook: bool = False) -> tuple[list[Field], bool]:
    """The fields of a config whose selectors are as in `tree`, and whether the `model`
    section is open (extra fields allowed: an experiment with its own make_model)."""
    fields = list(COMMON_FIELDS)
    model = _get(tree, "model.name")
    if model in MODEL_FIELDS:
        fields += MODEL_FIELDS[model]
    fields += DATA_FIELDS.get(DATA_KINDS.get(_get(tree, "data.name")), ())
    fields += TASK_FIELDS.get(_get(tree, "task"), ())
    # Each kind's fields beside their section's common ones, so describe reads by section.
    first = {}
    for index, field in enumerate(COMMON_FIELDS):
        first.setdefault(field.key.split(".")[0], index)
    rank = {f.key: first.get(f.key.split(".")[0], len(first)) for f in fields}
    return sorted(fields, key=lambda f: rank[f.key]), has_model_hook


def all_keys() -> list[str]:
    """Every key of every kind, for close-match suggestions."""
    tables = [COMMON_FIELDS, *MODEL_FIELDS.values(), *DATA_FIELDS.values(),
              *TASK_FIELDS.values()]
    return list(dict.fromkeys(f.key for table in tables for f in table))


def _leaves(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf; a free-form mapping field counts as one leaf."""
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, Mapping) and key not in _MAPPING_KEYS:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


_MAPPING_KEYS = {f.key for f in COMMON_FIELDS if f.type is dict}


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def resolve(given: Mapping, source: str, has_model_hook: bool = False) -> dict:
    """Schema defaults overlaid with an experiment's literal config, as a plain nested dict.

    `source` names the file in messages. Refuses keys the schema does not know, values of
    the wrong type, selectors outside their choices, and missing required fields.
    """
    where = f" in {source}"
    for selector in SELECTORS:
        field = _field(selector)
        value = _get(given, selector, REQUIRED)
        if value is REQUIRED:
            raise UserError(f"{source}: get_config() must set {selector} ({field.help})")
        field.coerce(value, where)
        if not (selector == "model.name" and has_model_hook):
            _refuse_problem(field, value, where)
    fields, open_model = fields_for(given, has_model_hook)
    by_key = {f.key: f for f in fields}
    resolved: dict = {}
    for field in fields:
        if field.default is not REQUIRED:
            _set(resolved, field.key, _copy(field.default))
    for key, value in _leaves(given):
        field = by_key.get(key)
        if field is None and open_model and key.startswith("model."):
            _set(resolved, key, _as_tuples(value))
            continue
        group = [f.key for f in fields if f.key.startswith(key + ".")]
        if field is None and group:
            raise UserError(f"{source}: get_config() sets {key}={show(value)}, but {key} is "
                            f"a group; set its fields: {', '.join(group)}")
        if field is None:
            raise UserError(f"{source}: get_config() sets {key}, which is no config key"
                            f"{_why_unknown(key, given)}")
        value = field.coerce(value, where)
        if field.type is not dict and not (key == "model.name" and has_model_hook):
            _refuse_problem(field, value, where)
        _set(resolved, key, value)
    for field in fields:
        if field.default is REQUIRED and _get(resolved, field.key, REQUIRED) is REQUIRED:
            raise UserError(f"{source}: get_config() must set {field.key} ({field.help})")
    return resolved


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _field(key: str) -> Field:
    return next(f for f in COMMON_FIELDS if f.key == key)


def _why_unknown(key: str, given: Mapping) -> str:
    """A hint: the close matches, or the kind of experiment the key belongs to."""
    for selector, tables in (("model.name", MODEL_FIELDS), ("task", TASK_FIELDS)):
        for name, table in tables.items():
            if any(f.key == key for f in table):
                return (f" for {selector}={show(_get(given, selector))}; it is a field of "
                        f"{selector}={show(name)}")
    kinds = [f"{kind} datasets ({', '.join(n for n, k in DATA_KINDS.items() if k == kind)})"
             for kind, table in sorted(DATA_FIELDS.items(), key=lambda item: item[0] != "text")
             if any(f.key == key for f in table)]
    if kinds:
        return (f" for data.name={show(_get(given, 'data.name'))}; it is a field of "
                + " and ".join(kinds))
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6)
    return f". Did you mean: {', '.join(close)}?" if close else ""


def _refuse_problem(field: Field, value: Any, where: str = "") -> None:
    problem = field.problem(value)
    if problem:
        raise UserError(f"--config.{field.key}={show(value)}{where}: {problem}")


def check(config: Mapping, selected: Mapping[str, Any], has_model_hook: bool = False
          ) -> None:
    """After overrides: the selectors still pick the fields the experiment resolved to
    (`selected`: each selector's value in the experiment file), and every value is among
    its choices and above its minimum."""
    config = _plain_tree(config)
    fields, _ = fields_for(config, has_model_hook)
    before, _ = fields_for(_tree(selected), has_model_hook)
    if [f.key for f in fields] != [f.key for f in before]:
        changed = next(s for s in SELECTORS if _get(config, s) != selected[s])
        raise UserError(f"--config.{changed}={show(_get(config, changed))}: needs other "
                        f"fields than {changed}={show(selected[changed])} in the experiment; "
                        "write an experiment file for it")
    for field in fields:
        if field.key == "model.name" and has_model_hook:
            continue
        if field.type is not dict:
            _refuse_problem(field, _get(config, field.key))


def selectors(tree: Mapping) -> dict[str, Any]:
    """The values that decide which fields a config has."""
    return {s: _get(tree, s) for s in SELECTORS}


def _tree(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        _set(tree, key, value)
    return tree


def _differs(field: Field, value: Any) -> bool:
    if field.key == "experiment":  # always the file's own name: marking it says nothing
        return False
    return field.default is REQUIRED or value != field.default


def describe(config: Mapping, has_model_hook: bool = False) -> str:
    """Every field with its resolved value and help; `*` marks a value that differs from the
    schema default (a required field has none, so it is always marked)."""
    config = _plain_tree(config)
    fields, open_model = fields_for(config, has_model_hook)
    rows = [(_differs(f, _get(config, f.key)), f.key, show(_get(config, f.key)), f.help)
            for f in fields]
    if open_model:
        known = {f.key for f in fields}
        rows += [(True, k, show(v), "the experiment's own field, read by its make_model")
                 for k, v in _leaves(config) if k.startswith("model.") and k not in known]
    key_width = max(len(r[1]) for r in rows)
    value_width = min(max(len(r[2]) for r in rows), 24)
    lines = ["config (* differs from the schema default):"]
    for marked, key, value, help_text in rows:
        lines.append(f"{'*' if marked else ' '} {key:<{key_width}}  {value:<{value_width}}  "
                     f"{help_text}")
    return "\n".join(lines)
