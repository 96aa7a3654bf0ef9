"""Every `keras.optimizers.Adam` option, alone and combined: the configurations the option parity
is measured on, as `keras_adam` and as the Keras reference runners take them."""

from __future__ import annotations

from typing import Any

# name -> Keras config (JSON-able; "schedule" stands for `keras_option_schedule()`, and
# "_exclude_params" lists parameter names excluded from weight decay).
KERAS_ADAM_OPTIONS: dict[str, dict[str, Any]] = {
  "weight_decay": {"weight_decay": 0.004},
  "weight_decay_exclude": {
    "weight_decay": 0.05,
    "learning_rate": 0.01,
    "_exclude_params": ["bias", "scale"],
  },
  "clipnorm": {"clipnorm": 1.0},
  "global_clipnorm": {"global_clipnorm": 1.0},
  "clipvalue": {"clipvalue": 0.5},
  "ema": {"use_ema": True},
  "ema_overwrite": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 7},
  "loss_scale_factor": {"loss_scale_factor": 128.0},
  "loss_scale_factor_3": {"loss_scale_factor": 3.0},
  "accumulation": {"gradient_accumulation_steps": 4},
  "accumulation_3": {"gradient_accumulation_steps": 3},
  "schedule": {"learning_rate": "schedule"},
  "accumulation_schedule": {"gradient_accumulation_steps": 2, "learning_rate": "schedule"},
  "wd_globalclip_ema": {"weight_decay": 0.01, "global_clipnorm": 5.0, "use_ema": True},
  "amsgrad_clipnorm_wd": {"amsgrad": True, "clipnorm": 2.0, "weight_decay": 0.004},
  "accumulation_ema_overwrite": {
    "gradient_accumulation_steps": 2,
    "use_ema": True,
    "ema_overwrite_frequency": 5,
  },
  "everything": {
    "learning_rate": "schedule",
    "amsgrad": True,
    "weight_decay": 0.004,
    "global_clipnorm": 10.0,
    "use_ema": True,
    "ema_overwrite_frequency": 11,
    "loss_scale_factor": 4.0,
    "gradient_accumulation_steps": 4,
  },
}
# XLA divides by a constant as a multiplication by its reciprocal (so does Keras-on-JAX, jitted),
# TensorFlow and op-by-op Keras-JAX divide: with these non-powers of two the two references
# differ from each other.
KERAS_OPTIONS_NOT_POW2 = frozenset({"loss_scale_factor_3", "accumulation_3"})
# Keras-on-JAX accumulates with `lax.cond`, which run op by op takes minutes for 600 steps.
KERAS_OPTIONS_ACCUMULATING = frozenset(
  name for name, config in KERAS_ADAM_OPTIONS.items() if "gradient_accumulation_steps" in config
)


def keras_option_schedule() -> Any:
  """The learning-rate schedule that "schedule" stands for (imports Keras).

  `decay_steps` is a power of two: XLA compiles `step / decay_steps` as a multiplication by the
  reciprocal, exact only then (eager Keras-on-JAX and TF divide).
  """
  import keras

  return keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=32, decay_rate=0.9)


def keras_option_config(name: str) -> dict[str, Any]:
  """`KERAS_ADAM_OPTIONS[name]` as the Keras runners take it (the schedule serialised)."""
  config = dict(KERAS_ADAM_OPTIONS[name])
  if config.get("learning_rate") == "schedule":
    import keras

    schedule = keras.optimizers.schedules.serialize(keras_option_schedule())
    config["learning_rate"] = {"schedule": schedule}
  return config


def keras_adam_for_option(name: str, **kwargs: Any) -> Any:
  """`adamjax.keras_adam` configured as `KERAS_ADAM_OPTIONS[name]` (`kwargs` added, e.g.
  `fused_multiply_add=True`); excluded names become anchored `exclude_from_weight_decay`
  patterns."""
  import adamjax

  config = dict(KERAS_ADAM_OPTIONS[name])
  if config.get("learning_rate") == "schedule":
    config["learning_rate"] = keras_option_schedule()
  if "_exclude_params" in config:
    config["exclude_from_weight_decay"] = [f"^{n}$" for n in config.pop("_exclude_params")]
  return adamjax.keras_adam(**config, **kwargs)
