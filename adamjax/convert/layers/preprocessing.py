"""Keras's numeric preprocessing layers: Rescaling and Normalization
(``keras/src/layers/preprocessing/{rescaling,normalization}.py``).

Their constants (``scale``/``offset``; a Normalization's ``mean``/``variance`` given in the
config) are data in the config: numbers, nested lists of numbers, or Keras's serialized arrays
(``{"class_name": "__numpy__" | "__tensor__", "config": {"value": ..., "dtype": ...}}``). They
are kept as nested tuples and turned into arrays as Keras's JAX backend does
(``convert_to_tensor``), so the rounding to the compute dtype is the same.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register

_EPSILON = 1e-7  # keras.backend.epsilon()
_DTYPES = frozenset(
  {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64"}
)
_MAX_ELEMENTS = 1 << 20


def _nested(value: Any, key: str, depth: int = 0) -> Any:
  """A number or nested list of numbers as nested tuples (hashable, static)."""
  if isinstance(value, Real) and not isinstance(value, bool):
    return value
  if isinstance(value, list | tuple) and depth < 8:
    return tuple(_nested(v, key, depth + 1) for v in value)
  raise ConversionError(f"config {key} is not a number or a nested list of numbers")


def constant(value: Any, key: str) -> tuple[str, Any, str | None] | None:
  """A config constant as ``(kind, nested value, stored dtype)``; None for null."""
  if value is None:
    return None
  if isinstance(value, dict):
    kind = value.get("class_name")
    inner = value.get("config")
    if kind not in ("__numpy__", "__tensor__") or not isinstance(inner, dict):
      raise ConversionError(f"config {key} is not a number, a list or a serialized array")
    dtype = inner.get("dtype")
    if dtype not in _DTYPES:
      raise ConversionError(f"config {key} has dtype {dtype!r}, not a numeric dtype")
    nested = _nested(inner.get("value"), key)
    if np.size(np.asarray(nested, dtype=object)) > _MAX_ELEMENTS:
      raise ConversionError(f"config {key} has more than {_MAX_ELEMENTS} elements")
    return (kind, nested, dtype)
  nested = _nested(value, key)
  if np.size(np.asarray(nested, dtype=object)) > _MAX_ELEMENTS:
    raise ConversionError(f"config {key} has more than {_MAX_ELEMENTS} elements")
  try:
    np.asarray(nested, dtype=np.float64)
  except ValueError as e:
    raise ConversionError(f"config {key} is a ragged list") from e
  return ("plain", nested, None)


def _to_tensor(x: Any, dtype: Any) -> jax.Array:
  # keras/src/backend/jax/core.py convert_to_tensor(x, dtype).
  dtype = jnp.dtype(dtype)
  if isinstance(x, jax.Array):
    return x if x.dtype == dtype else jnp.asarray(x, dtype=dtype)
  if dtype == jnp.bfloat16:
    return jnp.asarray(x).astype(dtype)
  return jnp.asarray(x, dtype=dtype)


def _rank_as(value: jax.Array, ndim: int) -> jax.Array:
  # The implicit broadcast of Keras's arithmetic, spelled out (strict rank promotion runs too).
  return jnp.reshape(value, (1,) * (ndim - value.ndim) + value.shape)


def materialize(spec: tuple[str, Any, str | None], dtype: Any = None) -> Any:
  """What Keras's deserializer makes of a :func:`constant`, converted to ``dtype`` if given."""
  kind, value, stored = spec
  if kind == "__numpy__":
    value = np.array(value, dtype=stored)
  elif kind == "__tensor__":
    value = _to_tensor(value, stored)
  if dtype is None:
    return value if kind != "plain" else jnp.asarray(value)
  return _to_tensor(value, dtype)


@register("Rescaling")
class Rescaling(Layer):
  """``keras/src/layers/preprocessing/rescaling.py``: ``cast(x) * scale + offset`` in the compute
  dtype. ``scale``/``offset`` may be numbers or per-channel lists (channels last: Keras's global
  ``image_data_format``, which a file does not record, reshapes a list scale only for
  ``channels_first``)."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    if config.get("scale") is None:
      raise ConversionError("config scale is missing")
    self.scale = constant(config.get("scale"), "scale")
    self.offset = constant(config.get("offset", 0.0), "offset") or ("plain", 0.0, None)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    dtype = self.compute_dtype
    inputs = _to_tensor(inputs, dtype)
    scale = _rank_as(materialize(self.scale, dtype), inputs.ndim)
    offset = _rank_as(materialize(self.offset, dtype), inputs.ndim)
    return inputs * scale + offset


def _axes(config) -> tuple[int, ...]:
  axis = config.get("axis", -1)
  if axis is None:
    return ()
  if isinstance(axis, int) and not isinstance(axis, bool):
    return (axis,)
  if isinstance(axis, list | tuple) and all(
    isinstance(a, int) and not isinstance(a, bool) for a in axis
  ):
    return tuple(axis)
  raise ConversionError(f"config axis = {axis!r} is not an integer, a list of integers or null")


@register("Normalization")
class Normalization(Layer):
  """``keras/src/layers/preprocessing/normalization.py``: ``(x - mean) / max(sqrt(variance),
  1e-7)`` (``invert``: ``mean + x * max(sqrt(variance), 1e-7)``), statistics broadcast over the
  axes not in ``axis``.

  The statistics are either the config's ``mean``/``variance`` (numbers or lists, aligned with
  the kept axes from the right; no variables) or, for an adapted layer, the non-trainable
  variables ``mean`` and ``variance`` of shape ``input_shape[axis]`` and ``count``.
  """

  supports_masking = True

  @classmethod
  def variables(cls, config):
    return ("mean", "variance", "count") if config.get("mean") is None else ()

  @classmethod
  def non_trainable(cls, config):
    return frozenset(cls.variables(config))

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.axis = _axes(config)
    self.invert = bool(option(config, "invert", bool, False))
    mean, variance = config.get("mean"), config.get("variance")
    if (mean is None) != (variance is None):
      raise ConversionError("config mean and variance must both be set or both be null")
    self.input_mean = constant(mean, "mean")
    self.input_variance = constant(variance, "variance")
    if self.input_mean is not None:
      shape = np.shape(np.asarray(self.input_mean[1], dtype=object))
      if shape != np.shape(np.asarray(self.input_variance[1], dtype=object)):
        raise ConversionError("config mean and variance have different shapes")
      if len(shape) > len(self.axis):
        raise ConversionError(f"config mean of shape {shape} has more axes than axis {self.axis}")
    else:
      m, v = self.mean[...].shape, self.variance[...].shape
      if m != v or len(m) != len(self.axis):
        raise ConversionError(
          f"Normalization variables of shapes {m} and {v} do not match axis {self.axis}"
        )

  def _statistics(self, inputs):
    ndim = inputs.ndim
    if any(a < -ndim or a >= ndim for a in self.axis):
      raise ValueError(f"Normalization axis {self.axis} is out of range for rank {ndim}")
    keep = tuple(sorted(a if a >= 0 else a + ndim for a in self.axis))
    broadcast = [inputs.shape[d] if d in keep else 1 for d in range(ndim)]
    if self.input_mean is None:
      # Normalization.finalize_state: reshape the adapted variables, cast to the compute dtype.
      mean = jnp.reshape(self.mean[...], broadcast).astype(self.compute_dtype)
      variance = jnp.reshape(self.variance[...], broadcast).astype(self.compute_dtype)
      return mean, variance
    mean = materialize(self.input_mean)
    variance = materialize(self.input_variance)
    if jnp.ndim(mean) == 0:
      mean = jnp.broadcast_to(mean, broadcast)
      variance = jnp.broadcast_to(variance, broadcast)
    else:
      expanded = [1] * ndim
      for i in range(1, jnp.ndim(mean) + 1):
        expanded[keep[-i]] = jnp.shape(mean)[-i]
      mean = jnp.broadcast_to(jnp.reshape(mean, expanded), broadcast)
      variance = jnp.broadcast_to(jnp.reshape(variance, expanded), broadcast)
    return _to_tensor(mean, self.compute_dtype), _to_tensor(variance, self.compute_dtype)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    inputs = _to_tensor(inputs, self.compute_dtype)
    mean, variance = self._statistics(inputs)
    if self.invert:
      return jnp.add(mean, jnp.multiply(inputs, jnp.maximum(jnp.sqrt(variance), _EPSILON)))
    return jnp.divide(jnp.subtract(inputs, mean), jnp.maximum(jnp.sqrt(variance), _EPSILON))
