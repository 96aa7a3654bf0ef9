"""Keras operations in Functional graphs: ``keras.ops`` calls a model applies to its tensors.

A Functional model may apply ``keras.ops`` functions between layers (``ops.mean(x, axis=1)``,
``x * 2.0``); Keras 3 saves each as a node of class ``keras.src.ops.numpy.Mean`` etc., and inserts
one itself for an ``Embedding(mask_zero=True)`` mask (``NotEqual``). These are not layers: they own
no variables, are not saved in the weights file, do not autocast their inputs or pass masks on.
Each is computed as Keras's JAX backend computes it (``keras/src/backend/jax/{numpy,nn,core}.py``).
Only the operations below are accepted, with their options (``axis``, ``keepdims``...) checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer

# (module, class_name) -> the class that computes it.
OPS: dict[tuple[str, str], type[Operation]] = {}


def _tensor(x: Any) -> Any:
  """Keras's ``convert_to_tensor`` for an operand: ``jnp.asarray``, so a Python number stays
  weakly typed (``x * 2.0`` keeps a float16 ``x`` float16, as in Keras)."""
  if isinstance(x, int) and not isinstance(x, bool) and not -(2**31) <= x < 2**31:
    raise ConversionError(f"operand {x} does not fit int32")
  if isinstance(x, (bool, int, float)) or isinstance(x, jax.Array) or hasattr(x, "dtype"):
    return jnp.asarray(x)
  raise ConversionError(f"operand {x!r} is not a tensor or a number")


class Operation(Layer):
  """A Keras operation node: no variables, no autocast, no mask passed on."""

  autocast: ClassVar[bool] = False
  fn: ClassVar[Callable[..., Any]]
  options: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config, weights):
    super().__init__({}, weights)
    unknown = sorted(set(config) - {"name"} - set(self.options))
    if unknown:
      raise ConversionError(f"options {unknown} of {type(self).__name__} are not supported")
    self.kwargs = tuple((k, _static(config.get(k))) for k in self.options if k in config)

  def __call__(self, *args, training=False, mask=None, rngs=None):
    del training, mask, rngs
    return type(self).fn(*args, **dict(self.kwargs))


def _static(value: Any) -> Any:
  """An option as hashable data: ints, floats, strings, tuples of ints, None."""
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, tuple) and all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    return value
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise ConversionError(f"operation option {value!r} is not a number, a name or a list of ints")


def _op(module: str, class_name: str, fn: Callable[..., Any], *options: str) -> None:
  cls = type(class_name, (Operation,), {"fn": staticmethod(fn), "options": options})
  cls.__doc__ = f"``keras.ops`` {class_name} (``{module}``), as Keras's JAX backend computes it."
  OPS[module, class_name] = cls


def _binary(fn):
  return lambda x1, x2: fn(_tensor(x1), _tensor(x2))


def _mean(x, axis=None, keepdims=False):
  # Keras computes low-precision means in float32 and casts back (jax/numpy.py ``mean``).
  x = _tensor(x)
  compute = jnp.result_type(x.dtype, jnp.float32)
  result = compute if not jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
  return jnp.mean(x, axis=axis, keepdims=keepdims, dtype=compute).astype(result)


_NUMPY = "keras.src.ops.numpy"
for _name, _fn in {
  "Add": jnp.add,
  "Subtract": jnp.subtract,
  "Multiply": jnp.multiply,
  "Divide": jnp.divide,
  "TrueDivide": jnp.divide,
  "Maximum": jnp.maximum,
  "Minimum": jnp.minimum,
  "NotEqual": jnp.not_equal,
  "Equal": jnp.equal,
  "Greater": jnp.greater,
  "Less": jnp.less,
  "Matmul": jnp.matmul,
  "LogicalOr": jnp.logical_or,
  "LogicalAnd": jnp.logical_and,
}.items():
  _op(_NUMPY, _name, _binary(_fn))
for _name, _fn in {
  "Abs": jnp.abs,
  "Exp": jnp.exp,
  "Log": jnp.log,
  "Sqrt": jnp.sqrt,
  "Square": jnp.square,
  "Negative": jnp.negative,
  "Tanh": jnp.tanh,
  "LogicalNot": jnp.logical_not,
}.items():
  _op(_NUMPY, _name, lambda x, _fn=_fn: _fn(_tensor(x)))
_op(_NUMPY, "Mean", _mean, "axis", "keepdims")
_op(
  _NUMPY,
  "Sum",
  lambda x, axis=None, keepdims=False: jnp.sum(_tensor(x), axis, keepdims=keepdims),
  "axis",
  "keepdims",
)
_op(
  _NUMPY,
  "Max",
  lambda x, axis=None, keepdims=False: jnp.max(_tensor(x), axis, keepdims=keepdims),
  "axis",
  "keepdims",
)
_op(
  _NUMPY,
  "Min",
  lambda x, axis=None, keepdims=False: jnp.min(_tensor(x), axis, keepdims=keepdims),
  "axis",
  "keepdims",
)
# Keras writes these when it combines masks in a Functional graph (``Masking`` -> ``Concatenate``).
_op(
  _NUMPY,
  "Any",
  lambda x, axis=None, keepdims=False: jnp.any(_tensor(x), axis, keepdims=keepdims),
  "axis",
  "keepdims",
)
_op(
  _NUMPY,
  "All",
  lambda x, axis=None, keepdims=False: jnp.all(_tensor(x), axis, keepdims=keepdims),
  "axis",
  "keepdims",
)
_op(
  _NUMPY,
  "ZerosLike",
  lambda x, dtype=None: jnp.zeros_like(_tensor(x), dtype=dtype and _float_dtype(dtype)),
  "dtype",
)
_op(
  _NUMPY,
  "OnesLike",
  lambda x, dtype=None: jnp.ones_like(_tensor(x), dtype=dtype and _float_dtype(dtype)),
  "dtype",
)
_op(_NUMPY, "ExpandDims", lambda x, axis: jnp.expand_dims(_tensor(x), axis), "axis")
_op(_NUMPY, "Squeeze", lambda x, axis=None: jnp.squeeze(_tensor(x), axis=axis), "axis")
_op(_NUMPY, "Transpose", lambda x, axes=None: jnp.transpose(_tensor(x), axes), "axes")
_op(_NUMPY, "Reshape", lambda x, newshape: jnp.reshape(_tensor(x), newshape), "newshape")
_op(
  _NUMPY,
  "Concatenate",
  lambda xs, axis=0: jnp.concatenate([_tensor(x) for x in _list(xs)], axis=axis),
  "axis",
)
_op("keras.src.ops.core", "Cast", lambda x, dtype: _tensor(x).astype(_float_dtype(dtype)), "dtype")
_op("keras.src.ops.nn", "Softmax", lambda x, axis=-1: jax.nn.softmax(_tensor(x), axis=axis), "axis")
_op("keras.src.ops.nn", "Relu", lambda x: jax.nn.relu(_tensor(x)))
_op("keras.src.ops.nn", "Sigmoid", lambda x: jax.nn.sigmoid(_tensor(x)))


def _float_dtype(name: Any) -> str:
  """A dtype name an operation may produce (floats, int32/int64, bool)."""
  allowed = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")
  if name not in allowed:
    raise ConversionError(f"cast to {name!r}: not one of {allowed}")
  return name


def _list(xs: Any) -> list:
  if not isinstance(xs, (list, tuple)):
    raise ConversionError("Concatenate takes a list of tensors")
  return list(xs)
