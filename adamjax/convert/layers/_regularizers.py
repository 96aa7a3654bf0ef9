"""Keras's weight regularizers and constraints, from their configs (``keras/src/regularizers``,
``keras/src/constraints``).

A layer's ``kernel_regularizer`` (and ``bias_``, ``recurrent_``, ``depthwise_``, ...) adds a
penalty to the training loss; its ``*_constraint`` projects the variable after each optimizer
update. Both are plain data in the config: class name and numbers, checked here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError

_EPSILON = 1e-7  # keras.backend.epsilon()
REGULARIZERS = frozenset({"L1", "L2", "L1L2", "OrthogonalRegularizer"})
CONSTRAINTS = frozenset({"MaxNorm", "NonNeg", "UnitNorm", "MinMaxNorm"})
# Keras's string shorthands (``kernel_regularizer="l2"``) and their default factors.
_SHORTHANDS = {
  "l1": ("L1", {"l1": 0.01}),
  "l2": ("L2", {"l2": 0.01}),
  "l1l2": ("L1L2", {"l1": 0.0, "l2": 0.0}),
  "orthogonal_regularizer": ("OrthogonalRegularizer", {"factor": 0.01, "mode": "rows"}),
  "max_norm": ("MaxNorm", {}),
  "non_neg": ("NonNeg", {}),
  "unit_norm": ("UnitNorm", {}),
  "min_max_norm": ("MinMaxNorm", {}),
}


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
  value = config.get(key, default)
  if value is None:
    value = default
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ConversionError(f"regularizer/constraint option {key} = {value!r} is not a number")
  try:
    value = float(value)
  except OverflowError:
    value = math.inf
  if not 0 <= value < math.inf:
    raise ConversionError(f"regularizer/constraint option {key} = {value!r} is not finite, >= 0")
  return value


def parse(entry: Any, allowed: frozenset[str], what: str) -> tuple[str, tuple] | None:
  """A regularizer or constraint config as ``(class name, sorted option items)``, or None."""
  if entry is None:
    return None
  if isinstance(entry, str) and entry.lower() in _SHORTHANDS:
    name, config = _SHORTHANDS[entry.lower()]
  elif isinstance(entry, str) and entry in allowed:
    name, config = entry, {}
  elif isinstance(entry, dict):
    name, config = entry.get("class_name"), entry.get("config") or {}
  else:
    raise ConversionError(f"{what} {entry!r} is not a Keras {what} config")
  if name not in allowed or not isinstance(config, dict):
    raise ConversionError(f"{what} {name!r} is not one of Keras's built-in {sorted(allowed)}")
  if name == "OrthogonalRegularizer":
    mode = config.get("mode", "rows")
    if mode not in ("rows", "columns"):
      raise ConversionError(f"OrthogonalRegularizer mode {mode!r} is not rows or columns")
    return name, (("factor", _number(config, "factor", 0.01)), ("mode", mode))
  axis = config.get("axis", 0)
  if not (isinstance(axis, int) and not isinstance(axis, bool) and -8 <= axis < 8) and not (
    isinstance(axis, list)
    and all(isinstance(a, int) and not isinstance(a, bool) and -8 <= a < 8 for a in axis)
  ):
    raise ConversionError(f"{name} axis {axis!r} is not an axis or a list of axes")
  items = {
    "L1": {"l1": _number(config, "l1", 0.01)},
    "L2": {"l2": _number(config, "l2", 0.01)},
    "L1L2": {"l1": _number(config, "l1", 0.0), "l2": _number(config, "l2", 0.0)},
    "MaxNorm": {"max_value": _number(config, "max_value", 2.0), "axis": axis},
    "NonNeg": {},
    "UnitNorm": {"axis": axis},
    "MinMaxNorm": {
      "min_value": _number(config, "min_value", 0.0),
      "max_value": _number(config, "max_value", 1.0),
      "rate": _number(config, "rate", 1.0),
      "axis": axis,
    },
  }[name]
  return name, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(items.items()))


def penalty(spec: tuple[str, tuple], x: jax.Array) -> jax.Array:
  """The loss term Keras's regularizer adds for ``x`` (``keras/src/regularizers``)."""
  name, options = spec[0], dict(spec[1])
  if name == "L1":
    return jnp.asarray(options["l1"], x.dtype) * jnp.sum(jnp.abs(x))
  if name == "L2":
    return jnp.asarray(options["l2"], x.dtype) * jnp.sum(jnp.square(x))
  if name == "L1L2":
    total = jnp.asarray(0.0, x.dtype)
    if options["l1"] != 0.0:
      total += jnp.asarray(options["l1"], x.dtype) * jnp.sum(jnp.abs(x))
    if options["l2"] != 0.0:
      total += jnp.asarray(options["l2"], x.dtype) * jnp.sum(jnp.square(x))
    return total
  # OrthogonalRegularizer: mean absolute cosine between distinct rows (or columns).
  if x.ndim != 2:
    raise ConversionError(f"OrthogonalRegularizer needs a rank-2 weight, got shape {x.shape}")
  axis = 1 if options["mode"] == "rows" else 0
  norm = jnp.linalg.norm(x, ord=2, axis=axis, keepdims=True)
  x = jnp.divide(x, jnp.maximum(norm, _EPSILON))
  product = x @ x.T if axis == 1 else x.T @ x
  size = x.shape[0] if axis == 1 else x.shape[1]
  off_diagonal = product * (1.0 - jnp.eye(size, dtype=x.dtype))
  pairs = size * (size - 1.0) / 2.0
  return options["factor"] * 0.5 * jnp.sum(jnp.abs(off_diagonal)) / pairs


def constrain(spec: tuple[str, tuple], w: jax.Array) -> jax.Array:
  """Keras's constraint applied to ``w`` (``keras/src/constraints/constraints.py``)."""
  name, options = spec[0], dict(spec[1])
  if name == "NonNeg":
    return jnp.maximum(w, 0)
  axis = options["axis"]
  norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))
  if name == "UnitNorm":
    return w / (_EPSILON + norms)
  if name == "MaxNorm":
    desired = jnp.clip(norms, 0, options["max_value"])
  else:
    rate = options["rate"]
    desired = (
      rate * jnp.clip(norms, options["min_value"], options["max_value"]) + (1 - rate) * norms
    )
  return w * (desired / (_EPSILON + norms))
