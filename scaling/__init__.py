"""scaling: a JAX research framework for training and serving scaled models.

`FLOORS` is the house plan: each top-level package or module of `scaling` and the floor it
stands on. A module imports only from its own floor or below, and no two modules import each
other, directly or round a circle; `tests/test_imports.py` reads every module's imports and
holds them to this table, so a new package must be given a floor here before it can land.

- 0: `errors` (the exceptions every layer raises) and `artifact` (an exported classifier, read
  with jax and numpy alone, so a deployment host needs nothing above it).
- 1: `models`, `data`, `runtime`, `interop`: the model code, datasets and tokenizers, the
  run's machinery (checkpoints, workdir, metrics), and Hugging Face file formats; each is
  usable without the others.
- 2: `sharding`: the mesh and the rules that place the models' logical axes on it.
- 3: `training`, `inference`, `engine`, `preflight`, `config`: what is built on a mesh.
  `preflight` compiles `training`'s step and `inference` samples through `engine`'s
  sampling, both on the same floor without circles. `config` is the schema and experiment
  loading, which imports only `data` and `sharding`; it stands here, not with the entry
  points, because `serving` reads a workdir's recorded config to rebuild its model.
- 4: `serving`: the HTTP servers over the engine, the restored model and the artifact.
- 5: `main`, `serve`, `report`: the command lines.
"""

__version__ = "0.1.0"

FLOORS = {
    "errors": 0, "artifact": 0,
    "models": 1, "data": 1, "runtime": 1, "interop": 1,
    "sharding": 2,
    "training": 3, "inference": 3, "engine": 3, "preflight": 3, "config": 3,
    "serving": 4,
    "main": 5, "serve": 5, "report": 5,
}
