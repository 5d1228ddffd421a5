"""Serving a Hugging Face directory as it is (`python -m scaling.serve --model=DIR`), the
generation settings read from a model's files, and the server's flags made from
`EngineOptions`."""

import dataclasses
import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, child_env, run_cli
from serve_process import ServeProcess
from test_cli import assert_user_error
from test_hf import FIXTURES, write_experiment

from scaling.data.tokenizer import HuggingFaceTokenizer
from scaling.errors import UserError
from scaling.interop.hf_generation import read_generation_settings

SMALL = ["--max_num_seqs=2", "--kv_block_size=4", "--prefill_chunk=8"]


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "scaling.serve", "--port=0", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


class Tokenizer:
    eos_id = 7


def write_json(path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_every_engine_option_is_a_flag_with_its_default_and_help_text():
    from scaling.engine import EngineOptions
    from scaling.serving import lm_main

    names = [field.name for field in dataclasses.fields(EngineOptions)]
    missing = [name for name in names if name not in lm_main.ENGINE_FLAG_HELP]
    assert not missing, f"EngineOptions fields without a help text in lm_main: {missing}"
    assert set(lm_main.ENGINE_FLAG_HELP) <= set(names)  # no help left for a removed field
    for field in dataclasses.fields(EngineOptions):
        flag = lm_main.FLAGS[field.name]
        assert flag.default == field.default and flag.help == lm_main.ENGINE_FLAG_HELP[field.name]
    try:
        lm_main.FLAGS(["serve", "--kv_cache_dtype=int8", "--max_num_seqs=4"])
        assert lm_main.engine_options() == EngineOptions(max_num_seqs=4, kv_cache_dtype="int8")
        assert lm_main.FLAGS.allowed_origins is None
    finally:
        lm_main.FLAGS.unparse_flags()


def test_allowed_origins_are_origins_or_a_star():
    from scaling.serving.lm_main import parse_origins

    assert parse_origins(None) == ()
    assert parse_origins("http://localhost:3000, https://example.com/,*") == (
        "http://localhost:3000", "https://example.com", "*")
    for bad in ("localhost:3000", "http://example.com/app", "ftp://example.com"):
        with pytest.raises(UserError, match="--allowed_origins"):
            parse_origins(bad)


def test_generation_settings_from_a_list_an_int_and_the_model_config(tmp_path):
    """As vLLM reads them: generation_config.json when the directory has one (its eos ids
    and sampling keys), else config.json's; the tokenizer's eos id always stops."""
    listed = tmp_path / "listed"
    write_json(listed / "generation_config.json", {
        "eos_token_id": [1, 4], "temperature": 0.6, "top_p": 0.9, "top_k": None,
        "max_new_tokens": 64, "repetition_penalty": 1.1, "min_p": 0.05, "do_sample": True})
    write_json(listed / "config.json", {"eos_token_id": 9, "top_k": 5})  # not read
    settings = read_generation_settings(listed, Tokenizer())
    assert settings.stop_ids == {1, 4, 7}
    assert settings.defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64,
                                 "repetition_penalty": 1.1, "min_p": 0.05}

    single = tmp_path / "single"
    write_json(single / "generation_config.json", {"eos_token_id": 3, "top_k": 20})
    settings = read_generation_settings(single, Tokenizer())
    assert (settings.stop_ids, settings.defaults) == ({3, 7}, {"top_k": 20})

    model_config = tmp_path / "model_config"
    write_json(model_config / "config.json", {"eos_token_id": [2, 7], "model_type": "llama"})
    settings = read_generation_settings(model_config, Tokenizer())
    assert (settings.stop_ids, settings.defaults) == ({2, 7}, {})

    kept = tmp_path / "workdir_tokenizer"  # what --mode=import_hf keeps
    write_json(kept / "hf_config.json", {"eos_token_id": 5})
    assert read_generation_settings(kept, Tokenizer()).stop_ids == {5, 7}
    (tmp_path / "bare").mkdir()
    assert read_generation_settings(tmp_path / "bare", Tokenizer()).stop_ids == {7}


@pytest.mark.parametrize("text, words", [
    ("{\"eos_token_id\": [1,", "not readable JSON"),
    ("[1, 2]", "not an object"),
    ("{\"eos_token_id\": \"</s>\"}", "eos_token_id"),
    ("{\"temperature\": \"hot\"}", "temperature"),
    ("{\"max_new_tokens\": 0}", "max_new_tokens"),
])
def test_a_malformed_generation_config_is_refused_naming_the_file(tmp_path, text, words):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match="generation_config.json") as error:
        read_generation_settings(tmp_path, Tokenizer())
    assert words in str(error.value)


def test_a_malformed_generation_config_stops_the_server_with_one_line(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    (model / "generation_config.json").write_text("{\"eos_token_id\": [1,")
    result = serve_cli(f"--model={model}")
    assert_user_error(result, str(model / "generation_config.json"), "not readable JSON")


@pytest.mark.parametrize("other", ["--workdir=/tmp/somewhere", "--experiment=lm_1b",
                                   "--checkpoint_step=3"])
def test_model_with_workdir_flags_exits_2_with_one_line(other):
    result = serve_cli(f"--model={FIXTURES / 'llama'}", other)
    assert_user_error(result, "--model=", other.split("=")[0])


def test_no_model_a_missing_tokenizer_and_a_bad_generation_config_exit_2(tmp_path):
    assert_user_error(serve_cli("--experiment=lm_1b"), "--model=DIR", "--workdir=DIR")
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    (model / "tokenizer.json").unlink()
    assert_user_error(serve_cli(f"--model={model}"), "tokenizer.json")
    assert_user_error(serve_cli(f"--model={FIXTURES / 'llama'}", "--generation_config=greedy"),
                      "--generation_config=greedy")


def test_a_directory_config_is_its_architecture_over_the_schema_defaults():
    from test_hf import fields_of

    from scaling.serving.lm_main import hf_directory_config

    config = hf_directory_config(FIXTURES / "llama31", ["mesh.data=1"], "bfloat16", 32)
    assert {key: config.model[key] for key in fields_of("llama31")} == fields_of("llama31")
    assert (config.model.max_seq_len, config.model.dtype, config.model.param_dtype) == (
        32, "bfloat16", "bfloat16")
    assert config.data.tokenizer_model == str(FIXTURES / "llama31" / "tokenizer.json")
    assert config.mesh.data == 1 and config.experiment == "llama31"
    assert hf_directory_config(FIXTURES / "llama", []).model.max_seq_len == 64  # config.json's
    with pytest.raises(UserError, match="max_model_len"):
        hf_directory_config(FIXTURES / "llama", [], "float32", 1)


def complete(running, reference: dict, **fields) -> dict:
    status, models = running.request("GET", "/v1/models")
    assert status == 200
    status, body = running.request("POST", "/v1/completions", {
        "model": models["data"][0]["id"], "prompt": reference["input_ids"], **fields})
    assert status == 200, body
    return body


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_hugging_face_directory_serves_the_imported_models_greedy_tokens(tmp_path, family):
    """The fixture's greedy continuation, as transformers made it and as the imported
    workdir serves it (tests/test_serve_lm.py), token for token; the model's name is the
    --model string as given."""
    source = FIXTURES / family
    reference = json.loads((source / "reference.json").read_text())
    running = ServeProcess(tmp_path, f"--model={source}", *SMALL)
    try:
        status, models = running.request("GET", "/v1/models")
        body = complete(running, reference, max_tokens=len(reference["greedy"]),
                        temperature=0, ignore_eos=True, logprobs=0)
    finally:
        assert running.stop() == 0
    assert [m["id"] for m in models["data"]] == [str(source)]
    tokenizer = HuggingFaceTokenizer(str(source / "tokenizer.json"))
    pieces = body["choices"][0]["logprobs"]["tokens"]
    assert pieces == [tokenizer.decode([token]) for token in reference["greedy"]]
    assert body["usage"]["prompt_tokens"] == len(reference["input_ids"])


def test_generation_config_sets_the_stop_ids_and_the_request_defaults(tmp_path):
    """A generation_config.json that lists the third greedy token as an eos id and sets
    greedy decoding and max_new_tokens: a request that sets neither stops on that token; one
    with ignore_eos runs to the file's max_new_tokens."""
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    reference = json.loads((model / "reference.json").read_text())
    greedy = reference["greedy"]
    write_json(model / "generation_config.json", {
        "eos_token_id": [1, greedy[2]], "temperature": 0.0, "max_new_tokens": 6})
    running = ServeProcess(tmp_path, f"--model={model}", *SMALL)
    try:
        stopped = complete(running, reference)
        ignored = complete(running, reference, ignore_eos=True)
    finally:
        assert running.stop() == 0
    tokenizer = HuggingFaceTokenizer(str(model / "tokenizer.json"))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"].startswith(tokenizer.decode(greedy[:2]))
    assert stopped["usage"]["completion_tokens"] <= 3
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 6
    assert ignored["choices"][0]["text"] == tokenizer.decode(greedy[:6])

    # --generation_config=vllm, as vLLM's: the file's stop ids stay, its defaults do not.
    running = ServeProcess(tmp_path, f"--model={model}", "--generation_config=vllm", *SMALL)
    try:
        stopped = complete(running, reference, temperature=0)
        ignored = complete(running, reference, temperature=0, ignore_eos=True)
    finally:
        assert running.stop() == 0
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert ignored["usage"]["completion_tokens"] == 16  # --default_max_tokens


def test_an_exported_instruct_model_chats_and_stops_on_its_turn_end(tmp_path):
    """Llama 3 style: the import keeps the chat template and the generation config (eos
    ids <|end_of_text|> and <|eot_id|>), the export writes them back, and the export served
    with --model answers each chat as transformers did, ending on <|eot_id|>."""
    experiment = write_experiment(tmp_path, "llama3_instruct", max_seq_len=256)
    workdir, exported = tmp_path / "imported", tmp_path / "exported"
    result = run_cli(f"--experiment={experiment}", "--mode=import_hf",
                     f"--source={FIXTURES / 'llama3_instruct'}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(f"--experiment={experiment}", "--mode=export_hf", f"--workdir={workdir}",
                     f"--artifact={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads((FIXTURES / "llama3_instruct" / "reference.json").read_text())
    running = ServeProcess(tmp_path, f"--model={exported}", "--served_model_name=instruct",
                           *SMALL)
    try:
        answers = []
        for chat in reference["chats"][:3]:
            status, body = running.request("POST", "/v1/chat/completions", {
                "model": "instruct", "messages": chat["messages"], "temperature": 0,
                "max_tokens": reference["max_new_tokens"]})
            assert status == 200, body
            answers.append(body)
    finally:
        assert running.stop() == 0
    for chat, body in zip(reference["chats"][:3], answers, strict=True):
        assert body["choices"][0]["message"]["content"] == chat["text"]
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["prompt_tokens"] == len(chat["prompt_ids"])


def test_a_server_that_never_serves_fails_its_fixture_at_once_with_its_log(tmp_path):
    """The fixture does not wait out its start-up limits for a server that has exited: the
    failure comes as the process ends, and carries the server's own error line."""
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        ServeProcess(tmp_path, f"--model={tmp_path / 'absent'}")
    assert time.monotonic() - started < 30
    assert "the server exited" in str(failed.value)
    assert f"{tmp_path / 'absent'}: not a directory" in str(failed.value)
