"""What every mode relies on at run time.

Checkpoints, preemption, distributed start-up, the workdir, provenance, the compilation cache,
metrics, profiling, chip specs and start-up tricks. Nothing here imports the layers above.
"""
