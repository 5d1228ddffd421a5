"""Serving: the HTTP servers.

The classifier's (`server`, over the standalone loader of `scaling.artifact`) imports neither
flax nor the experiment: jax and numpy only. The language model's (`lm_server`, started by
`lm_main`) speaks the OpenAI API over the engine of `scaling.engine`.

`scaling.serving.load` stays as the documented way to load an exported model on a serving
host; it is the artifact package's loader.
"""

from scaling.artifact import ServedModel, load

__all__ = ["ServedModel", "load"]
