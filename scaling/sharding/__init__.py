"""How arrays lie on devices: the mesh, the logical-axis rules, batch and param shardings.

Training, inference, preflight and the serving engine all stand on `scaling.sharding.mesh`.
This package imports only the models, the runtime and the errors. `MESH_AXES` lives here,
free of JAX, so the config schema can name the axes before the heavy imports start.
"""

MESH_AXES = ("data", "fsdp", "context", "tensor")  # outermost to innermost
