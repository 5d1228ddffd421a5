"""Hugging Face checkpoints in and out: logits equal transformers', export and import
round-trip bitwise, shards are read only where they are needed, and bad input exits 2.

The fixtures under tests/fixtures/hf are tiny random checkpoints that
`tests/fixtures/hf/make_fixtures.py` wrote with transformers, with its logits and greedy
continuations; none of these tests needs torch or transformers.
"""

import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SHAKESPEARE_DIR, child_env, run_cli
from test_cli import assert_user_error

from scaling.config import experiments as config_lib
from scaling.inference import hf_checkpoint, sources
from scaling.interop import hf_config, safetensors_io
from scaling.runtime import checkpoint

FIXTURES = REPO / "tests" / "fixtures" / "hf"
FAMILIES = ("llama", "llama31", "qwen2")

EXPERIMENT = '''"""A tiny model with the architecture of a Hugging Face fixture."""
import ml_collections

def get_config():
    return ml_collections.ConfigDict({{
        "task": "language_modeling",
        "data": {{"name": "tiny_shakespeare", "tokenizer": "huggingface",
                 "tokenizer_model": "{tokenizer}", "seq_len": 16,
                 "manual_dir": "{shakespeare}", "prepare_if_missing": True,
                 "eval_max_windows": 64}},
        "model": {{"name": "transformer", "max_seq_len": 64, **{model}}},
        "optimizer": {{"name": "adam", "learning_rate": {learning_rate}}},
        "batch_size": 8, "eval_batch_size": 8, "num_steps": 2, "log_every_steps": 1,
    }})
'''


def fields_of(family: str) -> dict:
    directory = FIXTURES / family
    return hf_config.model_fields(hf_config.read(directory), directory / "config.json")


def write_experiment(directory: Path, family: str, learning_rate: float = 1e-3,
                     **model) -> Path:
    path = directory / f"{family}_tiny.py"
    text = EXPERIMENT.format(tokenizer=FIXTURES / family / "tokenizer.json",
                             shakespeare=SHAKESPEARE_DIR,
                             model=repr({**fields_of(family), **model}),
                             learning_rate=learning_rate)
    path.write_text(text)
    return path


def load(path: Path, *overrides: str):
    return config_lib.load_config(str(path), list(overrides))


def import_params(config, experiment, source: Path):
    from scaling.inference import restore

    spec = restore.model_spec(config, experiment)
    params, read = sources.read_into(source, config, spec.abstract_params)
    return spec, params, read


def reference(family: str) -> tuple[dict, np.ndarray]:
    directory = FIXTURES / family
    return (json.loads((directory / "reference.json").read_text()),
            np.load(directory / "logits.npy"))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_and_greedy_continuation_equal_transformers(family, tmp_path):
    from scaling.inference import sample

    config, experiment = load(write_experiment(tmp_path, family))
    spec, params, _ = import_params(config, experiment, FIXTURES / family)
    ref, want = reference(family)
    prompt = jnp.asarray([ref["input_ids"]], jnp.int32)
    logits = np.asarray(spec.model.apply({"params": params}, prompt)[0])
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
    greedy = sample.generate(spec.model, params, prompt, 0, jnp.asarray(0),
                             num_new=len(ref["greedy"]), temperature=0.0, top_k=0,
                             vocab_limit=config.model.vocab_size)
    assert np.asarray(greedy)[0].tolist() == ref["greedy"]


def test_hub_style_rope_scaling_reads_as_transformers_5_style(tmp_path):
    """Hub checkpoints of Llama 3.1 write rope_theta and rope_scaling; transformers 5 folds
    both into rope_parameters. Either gives the same model."""
    hf = hf_config.read(FIXTURES / "llama31")
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    assert hf_config.model_fields(hf, tmp_path) == fields_of("llama31")
    assert fields_of("llama31")["rope_scaling"] == "llama3"
    assert fields_of("llama31")["rope_original_max_len"] == 16


def test_import_sample_export_and_reimport_round_trip_bitwise(tmp_path):
    """Through the command line: import the sharded Llama fixture, sample its greedy
    continuation with its own tokenizer, export it, and import the export again."""
    experiment = write_experiment(tmp_path, "llama")
    workdir = tmp_path / "imported"
    source = FIXTURES / "llama"
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf", f"--source={source}",
                     f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported 26,784 params" in result.stdout
    record = json.loads((workdir / "provenance.jsonl").read_text().splitlines()[-1])
    assert record["import_source"]["path"] == str(source)
    assert len(record["import_source"]["files"]) == 7

    ref, _ = reference("llama")
    result = run_cli(f"--experiment={experiment}", "--mode=sample", f"--workdir={workdir}",
                     f"--prompt={ref['prompt']}", "--temperature=0",
                     f"--max_new_tokens={len(ref['greedy'])}")
    assert result.returncode == 0, result.stderr[-3000:]
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    expected = tokenizer.decode(ref["input_ids"] + ref["greedy"], skip_special_tokens=True)
    assert result.stdout.endswith(expected + "\n")

    exported = tmp_path / "exported"
    result = run_cli(f"--experiment={experiment}", "--mode=export_hf", f"--workdir={workdir}",
                     f"--artifact={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((exported / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": 1}  # the source had none: the tokenizer's ids
    assert (exported / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    again = run_cli(f"--experiment={experiment}", "--mode=export_hf", f"--workdir={workdir}",
                    f"--artifact={exported}")
    assert_user_error(again, f"--artifact={exported}", "already exists")

    config, module = load(experiment)
    _, original, _ = import_params(config, module, source)
    _, round_trip, _ = import_params(config, module, exported)
    manager = checkpoint.make_manager(workdir, 3)

    saved = checkpoint.restore_params(manager, 0, jax.eval_shape(lambda: original))
    manager.close()
    for a, b, c in zip(jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(saved),
                       jax.tree_util.tree_leaves(round_trip), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes() == np.asarray(c).tobytes()


def test_import_keeps_the_chat_and_generation_files_and_export_writes_them_back(tmp_path):
    """Beside the saved tokenizer, whichever the source has of the chat templates (the
    .jinja file, the older chat_template.json, the named ones), tokenizer_config.json,
    special_tokens_map.json and generation_config.json, and config.json as hf_config.json;
    the export writes them back, with the source's list of eos ids in its config.json."""
    from scaling.interop import hf_generation

    source = tmp_path / "source"
    shutil.copytree(FIXTURES / "llama3_instruct", source)
    (source / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 1 }}"}))
    (source / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    config, module = load(write_experiment(tmp_path, "llama3_instruct"))
    workdir = tmp_path / "run"
    hf_checkpoint.import_checkpoint(config, workdir, str(source), module)
    kept = workdir / "tokenizer"
    names = ["tokenizer_config.json", "chat_template.jinja", "chat_template.json",
             "special_tokens_map.json", "generation_config.json",
             "additional_chat_templates/tool_use.jinja"]
    for name in names:
        assert (kept / name).read_bytes() == (source / name).read_bytes(), name
    assert (kept / "hf_config.json").read_bytes() == (source / "config.json").read_bytes()
    assert not [p for p in kept.rglob("*") if "partial" in p.name]

    target = tmp_path / "exported"
    hf_checkpoint.export_checkpoint(config, workdir,
                                    hf_checkpoint.ExportOptions(target=str(target)), module)
    for name in names:
        assert (target / name).read_bytes() == (source / name).read_bytes(), name
    assert not (target / "hf_config.json").exists()
    assert json.loads((target / "config.json").read_text())["eos_token_id"] == [1, 4]
    from scaling.data.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(target / "tokenizer.json"))
    for directory in (source, kept, target):
        assert hf_generation.read_generation_settings(directory, tokenizer).stop_ids == {1, 4}


def test_export_in_shards_with_an_index_reimports_bitwise(tmp_path):
    experiment = write_experiment(tmp_path, "qwen2")
    config, module = load(experiment)
    workdir = tmp_path / "run"
    hf_checkpoint.import_checkpoint(config, workdir, str(FIXTURES / "qwen2"), module)
    target = tmp_path / "out"
    message = hf_checkpoint.export_checkpoint(config, workdir, hf_checkpoint.ExportOptions(
        target=str(target), max_shard_bytes=30_000), module)
    index = json.loads((target / safetensors_io.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and f"({len(files)} safetensors files" in message
    assert index["weight_map"]["model.layers.1.self_attn.k_proj.bias"] in files
    _, original, _ = import_params(config, module, FIXTURES / "qwen2")
    _, round_trip, _ = import_params(config, module, target)
    for a, b in zip(jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(round_trip),
                    strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_import_onto_fsdp_and_tensor_shards_each_device_its_block(tmp_path):
    experiment = write_experiment(tmp_path, "llama")
    config, module = load(experiment, "mesh.fsdp=4",
                          "mesh.tensor=2")
    _, params, _ = import_params(config, module, FIXTURES / "llama")
    one, _ = load(experiment)
    _, whole, _ = import_params(one, module, FIXTURES / "llama")
    query = params["layers"]["attention"]["query"]  # (layers, embed, heads, kv)
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in query.addressable_shards} == {(2, 8, 2, 8)}
    mlp = params["layers"]["mlp"]["down"]  # (layers, mlp, embed)
    assert mlp.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(whole),
                    strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


READER = '''
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from scaling.config import experiments as config_lib
from scaling.inference import restore
from scaling.inference import sources
config, experiment = config_lib.load_config(sys.argv[3], ["mesh.fsdp=8"])
spec = restore.model_spec(config, experiment)
params, read = sources.read_into(sys.argv[4], config, spec.abstract_params)
print(json.dumps({"read": read}))
'''


def test_two_processes_each_read_only_their_devices_slices(tmp_path):
    """Params split over fsdp=8 across two processes of four devices (every param has an
    embed axis, which the rules split over fsdp, norm scales included): each process reads
    exactly its half of the bytes, never the other's."""
    experiment = write_experiment(tmp_path, "llama")
    script = tmp_path / "reader.py"
    script.write_text(READER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**child_env(4), "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen(
        [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(experiment),
         str(FIXTURES / "llama")], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    reads = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        reads.append(json.loads(out.strip().splitlines()[-1])["read"])
    files = safetensors_io.TensorFiles(FIXTURES / "llama")
    total = sum(int(np.prod(files.shape(n))) * 4 for n in files.names())
    files.close()
    assert reads == [total // 2, total // 2]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def broken_copy(tmp_path: Path, family: str = "llama31") -> Path:
    target = tmp_path / "broken"
    shutil.copytree(FIXTURES / family, target)
    return target


def break_no_config(directory: Path) -> None:
    (directory / "config.json").unlink()


def break_architecture(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


def break_missing_shard(directory: Path) -> None:
    (directory / "model-00003-of-00007.safetensors").unlink()


def break_dtype(directory: Path) -> None:
    write_safetensors(directory / "model.safetensors", {"model.embed_tokens.weight": {
        "dtype": "I32", "shape": [128, 32], "data_offsets": [0, 128 * 32 * 4]}},
        bytes(128 * 32 * 4))


def break_truncated(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("family, damage, fragments", [
    ("llama31", break_no_config, ["config.json: missing"]),
    ("llama31", break_architecture, ["model_type=\"gpt2\" is not supported"]),
    ("llama", break_missing_shard, ["model-00003-of-00007.safetensors: missing"]),
    ("llama31", break_dtype, ["model.safetensors: model.embed_tokens.weight is stored as I32"]),
    ("llama31", break_truncated, ["model.safetensors", "truncated or damaged"]),
], ids=["no config.json", "unsupported architecture", "missing shard", "integer dtype",
        "truncated file"])
@pytest.mark.parametrize("python_flags", [(), ("-O",)], ids=["python", "python -O"])
def test_bad_checkpoints_exit_2_naming_the_file(family, damage, fragments, python_flags,
                                                tmp_path):
    source = broken_copy(tmp_path, family)
    damage(source)
    experiment = write_experiment(tmp_path, family)
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf", f"--source={source}",
                     f"--workdir={tmp_path / 'run'}", python_flags=python_flags)
    assert_user_error(result, str(source), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_a_vocabulary_larger_than_the_configs_exits_2_naming_the_field(tmp_path):
    experiment = write_experiment(tmp_path, "llama31", vocab_size=64)
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf",
                     f"--source={FIXTURES / 'llama31'}", f"--workdir={tmp_path / 'run'}")
    assert_user_error(result, "config.json", "--config.model.vocab_size=128")


def test_a_padded_vocabulary_imports_with_zero_rows(tmp_path):
    experiment = write_experiment(tmp_path, "qwen2", vocab_size=192)
    config, module = load(experiment)
    spec, params, _ = import_params(config, module, FIXTURES / "qwen2")
    assert params["embedding"].shape == (192, 32) and params["output"].shape == (32, 192)
    assert not np.asarray(params["embedding"][128:]).any()
    assert not np.asarray(params["output"][:, 128:]).any()
    ref, want = reference("qwen2")
    logits = spec.model.apply({"params": params}, jnp.asarray([ref["input_ids"]]))[0]
    np.testing.assert_allclose(np.asarray(logits[:, :128]), want, atol=1e-4 * np.abs(want).max())


def test_init_from_starts_training_from_a_checkpoint_and_a_hf_directory(tmp_path):
    """A fresh run with init_from holds the source's params at step 0 and a fresh optimizer;
    with a zero learning rate its checkpoint still holds them bitwise after two steps."""
    experiment = write_experiment(tmp_path, "llama31", learning_rate=0.0)
    imported = tmp_path / "imported"
    assert run_cli(f"--experiment={experiment}", "--mode=import_hf",
                   f"--source={FIXTURES / 'llama31'}", f"--workdir={imported}").returncode == 0
    refused = run_cli(f"--experiment={experiment}", f"--workdir={imported}")
    assert_user_error(refused, "holds params only", f"--config.init_from={imported}")

    config, module = load(experiment)
    _, original, _ = import_params(config, module, FIXTURES / "llama31")
    for source in (imported, FIXTURES / "llama31"):
        workdir = tmp_path / f"tuned_{source.name}"
        result = run_cli(f"--experiment={experiment}", f"--workdir={workdir}",
                         f"--config.init_from={source}")
        assert result.returncode == 0, result.stderr[-3000:]
        manager = checkpoint.make_manager(workdir, 3)
        assert manager.all_steps() == [2]

        tuned = checkpoint.restore_params(manager, 2, jax.eval_shape(lambda: original))
        manager.close()
        for a, b in zip(jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(tuned),
                        strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_init_from_a_workdir_of_another_model_is_refused_path_by_path(tmp_path):
    experiment = write_experiment(tmp_path, "llama31")
    imported = tmp_path / "imported"
    assert run_cli(f"--experiment={experiment}", "--mode=import_hf",
                   f"--source={FIXTURES / 'llama31'}", f"--workdir={imported}").returncode == 0
    other = write_experiment(tmp_path, "qwen2")
    result = run_cli(f"--experiment={other}", f"--workdir={tmp_path / 'tuned'}",
                     f"--config.init_from={imported}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "does not match this config" in result.stderr
    assert "params/layers/attention/query_bias: absent in the checkpoint" in result.stderr


def test_lora_trains_and_saves_only_the_adapters_and_merges_into_the_same_logits(tmp_path):
    """Fine-tune the Llama 3.1 fixture with rank-4 adapters: checkpoints hold the adapters
    alone, the optimizer keeps moments for them alone, the params read back (the adapters on
    init_from's) hold the imported ones bitwise, and the exported (merged) model gives the
    adapted model's logits."""
    from scaling.inference import restore
    from scaling.models import lora

    experiment = write_experiment(tmp_path, "llama31", learning_rate=1e-2, lora_rank=4)
    workdir = tmp_path / "tuned"
    common = (f"--experiment={experiment}", f"--workdir={workdir}",
              f"--config.init_from={FIXTURES / 'llama31'}")
    result = run_cli(*common, "--config.num_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run_cli(*common, "--config.num_steps=3")  # the frozen params come back too
    assert resumed.returncode == 0 and "resumed at step 2" in resumed.stdout, resumed.stderr
    config, module = load(experiment, f"init_from={FIXTURES / 'llama31'}")
    _, original, _ = import_params(config, module, FIXTURES / "llama31")
    manager = checkpoint.make_manager(workdir, 3)
    state_tree = manager.orbax.item_metadata(3).tree
    manager.close()
    saved = jax.tree_util.tree_leaves_with_path(state_tree["params"])
    assert len(saved) == 2 * 7 and all(lora.is_adapter(path) for path, _ in saved)
    adapter_size = sum(int(np.prod(leaf.shape)) for _, leaf in saved)
    moments = sum(int(np.prod(leaf.shape))
                  for leaf in jax.tree_util.tree_leaves(state_tree["opt_state"]))
    assert moments == 2 * adapter_size + 2  # mu and nu; Adam's and the schedule's counts

    tuned = restore.load(config, workdir, experiment=module).params
    for a, b in zip(jax.tree_util.tree_leaves(original),
                    jax.tree_util.tree_leaves(lora.without_adapters(tuned)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert np.abs(np.asarray(tuned["layers"]["mlp"]["down_lora_b"])).max() > 0

    ref, _ = reference("llama31")
    tokens = jnp.asarray([ref["input_ids"]])
    spec = restore.model_spec(config, module)
    adapted = np.asarray(spec.model.apply({"params": tuned}, tokens))
    base, _ = load(experiment, "model.lora_rank=0")
    base_spec = restore.model_spec(base, module)
    merged = lora.merged(tuned, 4, config.model.lora_alpha)
    np.testing.assert_allclose(np.asarray(base_spec.model.apply({"params": merged}, tokens)),
                               adapted, rtol=1e-5, atol=1e-5)
    assert np.abs(adapted - np.load(FIXTURES / "llama31" / "logits.npy")).max() > 1e-3

    exported = tmp_path / "merged"
    result = run_cli(*common, "--mode=export_hf", f"--artifact={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    _, reimported, _ = import_params(base, module, exported)
    np.testing.assert_allclose(
        np.asarray(base_spec.model.apply({"params": reimported}, tokens)), adapted,
        rtol=1e-5, atol=1e-5)


def test_lora_from_the_seed_evaluates_and_restores_on_the_same_frozen_params(tmp_path):
    """Without init_from the frozen params are the seed's init: eval and inference make
    them again, so eval after training reports the loss training reported, and the params
    inference reads carry the seed's init bitwise."""
    from scaling.inference import restore
    from scaling.models import lora
    from scaling.runtime.metrics import read_metrics
    from scaling.training import run as run_lib

    experiment = write_experiment(tmp_path, "qwen2", learning_rate=1e-2, lora_rank=2)
    workdir = tmp_path / "run"
    assert run_cli(f"--experiment={experiment}", f"--workdir={workdir}").returncode == 0
    evaluated = run_cli(f"--experiment={experiment}", f"--workdir={workdir}", "--mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(workdir) if r["split"] == "validation"]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)

    config, module = load(experiment)
    restored = restore.load(config, workdir, experiment=module).params
    run = run_lib.build_run_from_shapes(config, restore.model_spec(config, module).mesh,
                                        module)
    fresh = run.init().params
    for a, b in zip(jax.tree_util.tree_leaves(lora.without_adapters(fresh)),
                    jax.tree_util.tree_leaves(lora.without_adapters(restored)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
