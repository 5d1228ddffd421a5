"""Serving: the HTTP servers.

The classifier's (`server`, over the standalone loader `artifact`) imports neither flax nor
the experiment: jax and numpy only. The language model's (`lm_server`, started by `lm_main`)
speaks the OpenAI API over the engine of `scaling.engine`.
"""

from scaling.serving.artifact import ServedModel, load

__all__ = ["ServedModel", "load"]
