"""Where a run's params can come from besides its own checkpoints: a Hugging Face model
directory, or another workdir's latest checkpoint (`init_from`, and the frozen base of a
LoRA run). Reads go straight into the target shardings (`hf_params.read_params`), so each
process reads only what its devices hold."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from scaling.errors import UserError
from scaling.interop import hf_config, hf_params, safetensors_io
from scaling.runtime import checkpoint


def require_transformer(config: ml_collections.ConfigDict, what: str) -> None:
    if config.model.get("name") != "transformer":
        raise UserError(f"{what} needs a transformer language model; {config.experiment} "
                        f"uses model {config.model.get('name')}")


def read_into(directory: Path, config: ml_collections.ConfigDict,
              abstract_params) -> tuple[dict, int]:
    """The params of a Hugging Face directory in `abstract_params`' shardings, after checking
    its architecture against the config; and the bytes this process read."""
    directory = Path(directory)
    hf = hf_config.read(directory)
    fields = hf_config.model_fields(hf, directory / hf_config.CONFIG_FILE)
    hf_config.check_matches(config.model, fields, directory / hf_config.CONFIG_FILE)
    files = safetensors_io.TensorFiles(directory)
    try:
        hf_params.check_tensors(files, config.model, abstract_params,
                                 fields["vocab_size"], directory)
        params = hf_params.read_params(files, config.model, abstract_params)
        jax.block_until_ready(params)
        return params, files.bytes_read
    finally:
        files.close()


def initial_params(source: str, config: ml_collections.ConfigDict, abstract_params) -> dict:
    """`init_from`: params for a fresh run from a Hugging Face directory (it has a
    config.json) or from one of our workdirs (its latest checkpoint), in the run's shardings.
    A mismatch is refused path by path, as a restore is."""
    path = Path(source)
    if (path / hf_config.CONFIG_FILE).is_file() and any(path.glob("*.safetensors")):
        require_transformer(config, "--config.init_from with a Hugging Face directory")
        return read_into(path, config, abstract_params)[0]
    if not checkpoint.committed_steps(path / "checkpoints"):
        raise UserError(f"--config.init_from={source}: neither a Hugging Face model directory "
                        "(config.json and *.safetensors) nor a workdir with checkpoints")
    manager = checkpoint.make_manager(path, keep=1_000_000)
    try:
        return checkpoint.restore_params(manager, manager.latest_step(), abstract_params)
    finally:
        manager.close()
