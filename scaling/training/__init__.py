"""Training: the pure steps, the run (mesh, shardings, jit wrappers), the loop, tasks and the
optimizer."""
