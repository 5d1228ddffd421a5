"""XLA compiler options that an experiment sets for its own compiled steps, per platform.

The fastest XLA settings depend on the model, not only on the machine. On XLA:CPU, for
example, a batch-128 MLP's step is 1.14x faster with its small matmuls taken from YNNPACK
back to XLA's own dot, while a transformer gains nothing from that, and loses 1.14x if
YNNPACK's reductions go too (`bench/mlp_epoch.py`, `bench/README.md`). `XLA_FLAGS`
would force one choice on every program the process compiles; passing the options to
`jax.jit` scopes them to the experiment's train and eval steps, and they enter the compilation
cache key. An experiment names them per platform (a device's `platform`: cpu, gpu, tpu), so
CPU tuning never reaches an accelerator:

    "xla_options": {"cpu": {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_REDUCE"}},

The names are fields of XLA's DebugOptions, and enum values are spelt as the proto spells
them (`LIBRARY_FUSION_TYPE_REDUCE`, where XLA_FLAGS takes `reduce`). XLA only checks them when
it compiles a program, so `check` compiles a trivial one with each option first: a typo fails
with its config key named, before the real step compiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from scaling.errors import UserError

Options = dict[str, str | bool | int | float]


def for_platform(config: ml_collections.ConfigDict, platform: str | None) -> Options:
    """The experiment's options for `platform`; none for an unknown platform or experiment."""
    by_platform = config.xla_options
    if platform is None or platform not in by_platform:
        return {}
    options = by_platform[platform]
    if not isinstance(options, (dict, ml_collections.ConfigDict)):
        raise UserError(f"--config.xla_options.{platform}: expected a mapping of XLA option "
                        f"names to values, got {options!r}")
    return dict(options.items())


def check(options: Options, platform: str | None) -> None:
    """Compile a trivial program with each option on this machine's `platform` devices, so
    a misspelt name or a bad value is a UserError naming its config key."""
    if not options or platform != jax.default_backend():
        return  # another platform's options can only be checked where they compile
    for name, value in options.items():
        _check_one(platform, name, value)


@functools.cache  # every run built in one process would otherwise compile it again
def _check_one(platform: str, name: str, value: str | bool | int | float) -> None:
    try:
        jax.jit(jnp.negative, compiler_options={name: value}).lower(
            jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    except Exception as e:  # XLA raises a bare runtime error for unknown names or values
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--config.xla_options.{platform}.{name}={value!r}: XLA refused it "
                        f"({reason}); names and values are fields of XLA's DebugOptions"
                        ) from None
