"""Keras's built-in activations by name, and the activation layers, computed as the Keras JAX
backend computes them.

Sources: ``keras/src/activations/activations.py`` (what each name means, with Keras's defaults:
``gelu`` is the exact erf form, ``leaky_relu`` has slope 0.2, ``softmax``/``log_softmax`` run over
the last axis), ``keras/src/backend/jax/nn.py`` (the ``jax.nn`` call each one ends in) and
``keras/src/layers/activations/{activation,relu,leaky_relu,prelu,elu,softmax}.py`` (the layers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
from jax import nn as jnn

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import LAYERS, Layer, option, register


def _mish(x: jax.Array) -> jax.Array:
  # keras/src/activations/activations.py Mish.static_call.
  return x * jnn.tanh(jnn.softplus(x))


# Every name keras.activations.get accepts for a built-in (``_keras_config.ACTIVATIONS``), as the
# jax.nn function Keras's JAX backend calls, with Keras's default arguments.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "linear": lambda x: x,
  "relu": jnn.relu,
  "relu6": jnn.relu6,
  "leaky_relu": lambda x: jnn.leaky_relu(x, negative_slope=0.2),
  "elu": lambda x: jnn.elu(x, alpha=1.0),
  "selu": jnn.selu,
  "gelu": lambda x: jnn.gelu(x, False),  # keras.activations.gelu: approximate=False
  "sigmoid": jnn.sigmoid,
  "hard_sigmoid": jnn.hard_sigmoid,
  "softmax": lambda x: jnn.softmax(x, axis=-1),
  "log_softmax": lambda x: jnn.log_softmax(x, axis=-1),
  "softplus": jnn.softplus,
  "softsign": jnn.soft_sign,
  "tanh": jnp.tanh,
  "swish": jnn.silu,
  "silu": jnn.silu,
  "hard_silu": jnn.hard_silu,
  "hard_swish": jnn.hard_silu,
  "mish": _mish,
  "exponential": jnp.exp,
}


def get_activation(name: str | Mapping[str, Any] | None) -> Callable[[jax.Array], jax.Array]:
  """The function of a Keras activation name (``None`` is ``linear``, as ``activations.get``).

  Keras also takes an activation layer as a layer's ``activation`` (``Dense(activation=
  LeakyReLU(0.1))``), serialized as its config: ReLU, LeakyReLU, ELU, Softmax and Activation
  are accepted so, called as Keras calls a layer (inputs cast to its compute dtype).
  """
  if name is None:
    return ACTIVATIONS["linear"]
  if isinstance(name, Mapping) and name.get("class_name") in _LAYER_ACTIVATIONS:
    if name.get("module") not in (None, "keras.layers") or name.get("registered_name"):
      raise ConversionError(f"activation {name.get('class_name')!r} is not a Keras layer")
    config = name.get("config")
    if not isinstance(config, Mapping):
      raise ConversionError(f"activation {name.get('class_name')} has no config")
    return _layer_activation(name["class_name"], config)
  if not isinstance(name, str) or name not in ACTIVATIONS:
    shown = name.get("class_name") if isinstance(name, Mapping) else name
    raise ConversionError(f"activation {shown!r} is not a built-in Keras activation")
  return ACTIVATIONS[name]


_LAYER_ACTIVATIONS = ("ReLU", "LeakyReLU", "ELU", "Softmax", "Activation")


def _layer_activation(class_name: str, config: Mapping[str, Any]) -> Callable:
  layer = LAYERS[class_name](config, {})
  if class_name == "ReLU":
    fn = functools.partial(
      relu,
      negative_slope=layer.negative_slope,
      max_value=layer.max_value,
      threshold=layer.threshold,
    )
  elif class_name == "LeakyReLU":
    fn = functools.partial(jnn.leaky_relu, negative_slope=layer.negative_slope)
  elif class_name == "ELU":
    fn = functools.partial(jnn.elu, alpha=layer.alpha)
  elif class_name == "Softmax":
    fn = functools.partial(_softmax, axis=layer.axis)
  else:
    fn = layer.activation
  compute = jnp.dtype(layer.compute_dtype)

  def activation(x):
    # Layer.__call__: floating inputs are cast to the activation layer's own compute dtype.
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != compute:
      x = x.astype(compute)
    return fn(x)

  return activation


def _number(config, key: str, default: Any, *, optional: bool = False, signed: bool = False):
  """A real option, non-negative unless ``signed`` (``None`` allowed only if ``optional``)."""
  value = config.get(key, default)
  if value is None and optional:
    return None
  if not isinstance(value, Real) or isinstance(value, bool) or value != value:
    raise ConversionError(f"config {key} = {value!r} is not a number")
  if not signed and value < 0:
    raise ConversionError(f"config {key} = {value!r} is negative")
  return value


def relu(x: jax.Array, negative_slope=0.0, max_value=None, threshold=0.0) -> jax.Array:
  """``keras.activations.relu`` with its options (``ReLU.static_call``), operation for operation."""
  if negative_slope != 0.0:
    if max_value is None and threshold == 0:
      return jnn.leaky_relu(x, negative_slope=negative_slope)
    if threshold != 0:
      negative_part = jnn.relu(-x + threshold)
    else:
      negative_part = jnn.relu(-x)
  else:
    negative_part = 1
  clip_max = max_value is not None
  if threshold != 0:
    x = jnp.where(jnp.greater(x, jnp.asarray(threshold, x.dtype)), x, 0)
  elif max_value == 6:
    x = jnn.relu6(x)
    clip_max = False
  else:
    x = jnn.relu(x)
  if clip_max:
    x = jnp.clip(x, jnp.asarray(0.0, x.dtype), jnp.asarray(max_value, x.dtype))
  if negative_slope != 0.0:
    x = x - negative_slope * negative_part
  return x


@register("Activation")
class Activation(Layer):
  """``keras/src/layers/activations/activation.py``: the named activation."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.activation = get_activation(config.get("activation"))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return self.activation(inputs)


@register("ReLU")
class ReLU(Layer):
  """``keras/src/layers/activations/relu.py``: ``relu(x, negative_slope, max_value, threshold)``."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.max_value = _number(config, "max_value", None, optional=True)
    self.negative_slope = _number(config, "negative_slope", 0.0)
    self.threshold = _number(config, "threshold", 0.0)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return relu(inputs, self.negative_slope, self.max_value, self.threshold)


@register("LeakyReLU")
class LeakyReLU(Layer):
  """``keras/src/layers/activations/leaky_relu.py``: ``jax.nn.leaky_relu`` (default slope 0.3;
  tf-keras files name it ``alpha``, which Keras 3 still reads)."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    key = "alpha" if "alpha" in config else "negative_slope"
    self.negative_slope = _number(config, key, 0.3)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return jnn.leaky_relu(inputs, negative_slope=self.negative_slope)


@register("ELU")
class ELU(Layer):
  """``keras/src/layers/activations/elu.py``: ``jax.nn.elu(x, alpha)``."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.alpha = _number(config, "alpha", 1.0, signed=True)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return jnn.elu(inputs, alpha=self.alpha)


@register("PReLU")
class PReLU(Layer):
  """``keras/src/layers/activations/prelu.py``: ``relu(x) - alpha * relu(-x)``; ``alpha`` has the
  input's shape without the batch axis, with size 1 on ``shared_axes``."""

  supports_masking = True

  @classmethod
  def variables(cls, config):
    return ("alpha",)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    shared = config.get("shared_axes")
    if shared is not None and not isinstance(shared, list | tuple):
      shared = [shared]
    if shared is not None and not all(
      isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in shared
    ):
      raise ConversionError(f"config shared_axes = {shared!r} is not a list of axes >= 1")
    self.shared_axes = None if shared is None else tuple(shared)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    pos = jnn.relu(inputs)
    alpha = self.cast(self.alpha[...])
    alpha = jnp.reshape(alpha, (1,) * (inputs.ndim - alpha.ndim) + alpha.shape)
    neg = -alpha * jnn.relu(-inputs)
    return pos + neg


def _softmax(inputs: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
  if isinstance(axis, tuple) and len(axis) > 1:
    lse = jax.scipy.special.logsumexp(inputs, axis=axis, keepdims=True)
    return jnp.exp(inputs - lse)
  return jnn.softmax(inputs, axis=axis[0] if isinstance(axis, tuple) else axis)


def _large_negative_number(dtype) -> float:
  # keras/src/layers/activations/softmax.py: -1e9 does not fit float16.
  return -3e4 if jnp.dtype(dtype) == jnp.float16 else -1e9


@register("Softmax")
class Softmax(Layer):
  """``keras/src/layers/activations/softmax.py``: softmax over ``axis`` (an int or a list; over
  several axes as ``exp(x - logsumexp(x))``). A mask (True or > 0.5 keeps) sets the other
  positions to -1e9 (-3e4 in float16) before and to 0 after, and passes through unchanged."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    axis = config.get("axis", -1)
    if isinstance(axis, list | tuple):
      if not axis or not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        raise ConversionError(f"config axis = {axis!r} is not an integer or a list of integers")
      axis = tuple(axis)
    else:
      axis = option(config, "axis", int, -1)
    self.axis = axis

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if mask is not None:
      if mask.ndim > inputs.ndim or any(
        m != 1 and m != i for m, i in zip(mask.shape[::-1], inputs.shape[::-1], strict=False)
      ):
        raise ValueError(
          f"Softmax mask of shape {mask.shape} does not broadcast to inputs {inputs.shape}"
        )
      if mask.dtype != jnp.bool_:
        mask = jnp.greater(mask, jnp.asarray(0.5, mask.dtype))
      mask = jnp.reshape(mask, (1,) * (inputs.ndim - mask.ndim) + mask.shape)
      inputs = jnp.where(mask, inputs, _large_negative_number(inputs.dtype))
    outputs = _softmax(inputs, self.axis)
    if mask is not None:
      outputs = jnp.where(mask, outputs, 0.0)
    return outputs
