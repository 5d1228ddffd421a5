"""The optax transformation and learning-rate schedule that a config asks for."""

from __future__ import annotations

import jax
import ml_collections
import optax

from scaling.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")


def make_schedule(optimizer_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    name = optimizer_config.schedule
    peak = optimizer_config.learning_rate
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "warmup_cosine":
        warmup = optimizer_config.warmup_steps
        if not 0 <= warmup < total_steps:
            raise UserError(f"--config.optimizer.warmup_steps={warmup}: must lie in "
                            f"[0, {total_steps}), the number of training steps")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
            end_value=peak * optimizer_config.final_lr_fraction)
    raise UserError(f"--config.optimizer.schedule={name}: expected one of {', '.join(SCHEDULES)}")


NO_DECAY_NAMES = ("bias", "scale")


def decay_mask(params):
    """Weight decay applies to weight matrices, never to biases or norm scales.

    Names decide, not ranks: a norm scale stacked over scanned layers is two-dimensional.
    """
    def decays(path, p) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", "")) if path else ""
        return p.ndim > 1 and name not in NO_DECAY_NAMES and not name.endswith("_bias")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optimizer_config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optimizer_config, total_steps)
    name = optimizer_config.name
    if name == "adam":
        base = optax.adam(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                          eps=optimizer_config.eps)
    elif name == "adamw":
        base = optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                           eps=optimizer_config.eps,
                           weight_decay=optimizer_config.weight_decay, mask=decay_mask)
    elif name == "sgd":
        base = optax.sgd(schedule, momentum=optimizer_config.momentum or None,
                         nesterov=optimizer_config.nesterov)
    else:
        raise UserError(f"--config.optimizer.name={name}: expected one of "
                        f"{', '.join(OPTIMIZERS)}")
    clip = optimizer_config.clip_norm
    if clip < 0:
        raise UserError(f"--config.optimizer.clip_norm={clip}: must be >= 0 (0 disables it)")
    if clip > 0:
        base = optax.chain(optax.clip_by_global_norm(clip), base)
    return base, schedule
