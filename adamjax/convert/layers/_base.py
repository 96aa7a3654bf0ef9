"""The layer registry: Keras ``class_name`` -> an NNX module that computes what the Keras layer does.

One registry, filled per Keras layer family by the :func:`register` decorator (tf2jax's op table
is the model), so adding a layer is one class in one family module and the unsupported set of a
config is known before anything is built. A registered class says, from the layer's config alone:

- :meth:`Layer.variables`: the Keras variables it owns, in Keras's order (``layer.weights``, which
  is also the order of its ``trainable_variables`` and of its h5 ``vars/<i>`` datasets). A name
  ``"cell/kernel"`` lives in the sub-layer group ``cell`` of the h5 file (``layers/lstm/cell/
  vars/0``) and at the attribute path ``cell.kernel`` of the built module.
- :meth:`Layer.non_trainable`: those Keras creates with ``trainable=False`` (BatchNorm's moving
  statistics); they become ``nnx.BatchStat``, all others ``nnx.Param``.
- :attr:`Layer.flax_names`: where Flax's own name for a variable differs (BatchNorm's ``gamma`` is
  ``scale``), so a built module and a hand-written ``nnx.BatchNorm`` have the same state paths.

The module is built from the config and the file's arrays (``__init__(config, weights)``) and is
called as Keras calls the layer: ``layer(*inputs, training=..., mask=..., rngs=...)``. Numerics
follow the Keras source file each family module names; the Keras JAX backend is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers import _regularizers

# Keras class_name -> the module class that builds it.
LAYERS: dict[str, type[Layer]] = {}

_POLICIES = {
  "float32": ("float32", "float32"),
  "float16": ("float16", "float16"),
  "bfloat16": ("bfloat16", "bfloat16"),
  "float64": ("float64", "float64"),
  "mixed_float16": ("float16", "float32"),
  "mixed_bfloat16": ("bfloat16", "float32"),
}


def register(*class_names: str):
  """Class decorator: the decorated :class:`Layer` builds these Keras classes."""

  def add(cls: type[Layer]) -> type[Layer]:
    for name in class_names:
      if name in LAYERS:
        raise RuntimeError(f"Keras class {name} registered twice")
      LAYERS[name] = cls
    return cls

  return add


def dtype_policy(config: Mapping[str, Any]) -> tuple[str, str]:
  """``(compute dtype, variable dtype)`` of a layer's ``dtype`` config entry (Keras 3's policy
  object, a tf-keras policy dict, or a plain dtype name); float32 when absent."""
  policy = config.get("dtype")
  if isinstance(policy, dict):
    inner = policy.get("config")
    policy = inner.get("name") if isinstance(inner, dict) else inner
  if policy is None:
    return _POLICIES["float32"]
  if not isinstance(policy, str) or policy not in _POLICIES:
    raise ConversionError(f"dtype policy {policy!r} is not a float policy the converter supports")
  return _POLICIES[policy]


class Layer(nnx.Module):
  """A Keras layer as an NNX module. Subclasses override what their Keras class does.

  Attributes:
    supports_masking: Keras's flag: the layer passes a mask on (through :meth:`compute_mask`).
      Where it is False, the layer's output carries no mask, as in Keras.
    call_args: Names of the tensor arguments of Keras's ``call`` in order (``("inputs",)``;
      ``("query", "value", "key")`` for MultiHeadAttention). With one, the graph passes its mask
      as ``mask=``; with several, as ``<name>_mask=`` keyword arguments, as Keras does.
    autocast: Whether the graph casts floating inputs to the compute dtype first (Keras layers
      do; ``keras.ops`` operations do not).
    flax_names: Keras variable name -> attribute path in the module, where they differ.
    option_names: Keras variable name -> the prefix of its ``*_regularizer``/``*_constraint``
      options, where it is not the name without ``_kernel`` (``kernel`` -> ``kernel_regularizer``,
      ``recurrent_kernel`` -> ``recurrent_regularizer``; DepthwiseConv's ``kernel`` ->
      ``depthwise_regularizer``).
  """

  supports_masking: ClassVar[bool] = False
  autocast: ClassVar[bool] = True
  call_args: ClassVar[tuple[str, ...]] = ("inputs",)
  flax_names: ClassVar[Mapping[str, str]] = {}
  option_names: ClassVar[Mapping[str, str]] = {}

  @classmethod
  def variables(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
    """The Keras variables a layer with this config owns, in Keras's order."""
    del config
    return ()

  @classmethod
  def non_trainable(cls, config: Mapping[str, Any]) -> frozenset[str]:
    """The variables Keras creates with ``trainable=False``."""
    del config
    return frozenset()

  def __init__(self, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]):
    self.compute_dtype, self.variable_dtype = dtype_policy(config)
    non_trainable = self.non_trainable(config)
    regularized, constrained = [], []
    for name in self.variables(config):
      kind = nnx.BatchStat if name in non_trainable else nnx.Param
      path = self.flax_names.get(name, name)
      set_path(self, path, kind(jnp.asarray(weights[name])))
      prefix = self.option_names.get(name, name.rsplit("/", 1)[-1].removesuffix("_kernel"))
      reg = _regularizers.parse(
        config.get(f"{prefix}_regularizer"), _regularizers.REGULARIZERS, "regularizer"
      )
      if reg is not None and name not in non_trainable:
        regularized.append((path, reg))
      con = _regularizers.parse(
        config.get(f"{prefix}_constraint"), _regularizers.CONSTRAINTS, "constraint"
      )
      if con is not None:
        axes = dict(con[1]).get("axis", 0)
        ndim = np.ndim(weights[name])
        if any(not -ndim <= a < ndim for a in (axes if isinstance(axes, tuple) else (axes,))):
          raise ConversionError(
            f"{con[0]} axis {axes} does not fit {name}, a weight of rank {ndim}"
          )
        constrained.append((path, con))
    # Static: which variables carry a penalty or a constraint, and Keras's activity regularizer.
    self.regularized, self.constrained = tuple(regularized), tuple(constrained)
    self.activity_regularizer = _regularizers.parse(
      config.get("activity_regularizer"), _regularizers.REGULARIZERS, "regularizer"
    )

  def __call__(self, inputs: Any, *, training: bool = False, mask: Any = None, rngs: Any = None):
    raise NotImplementedError

  def compute_mask(self, inputs: Any, mask: Any) -> Any:
    """The output mask, given the input mask (called only if ``supports_masking``)."""
    del inputs
    return mask

  def cast(self, value: jax.Array) -> jax.Array:
    """A variable's value in the compute dtype (Keras's autocast under a mixed policy)."""
    return value.astype(self.compute_dtype) if value.dtype != self.compute_dtype else value

  def losses(self) -> list[jax.Array]:
    """Penalties Keras adds to the loss for this layer's weights (its ``*_regularizer`` options),
    in the variables' order, each computed on the stored (variable-dtype) value as Keras does;
    then those of the layers it wraps (Bidirectional's forward and backward layers)."""
    own = [
      _regularizers.penalty(spec, get_path(self, path)[...]) for path, spec in self.regularized
    ]
    return own + [loss for layer in self._sublayers() for loss in layer.losses()]

  def apply_constraints(self) -> None:
    """Projects each constrained variable in place, as Keras does after an optimizer step."""
    for path, spec in self.constrained:
      variable = get_path(self, path)
      variable.set_value(_regularizers.constrain(spec, variable[...]))
    for layer in self._sublayers():
      layer.apply_constraints()

  def _sublayers(self) -> list[Layer]:
    return [value for value in vars(self).values() if isinstance(value, Layer)]


def set_path(module: nnx.Module, path: str, value: Any) -> None:
  """``module.a.b = value`` for ``path == "a/b"``, creating empty modules on the way."""
  *parents, leaf = path.split("/")
  for part in parents:
    if not hasattr(module, part):
      setattr(module, part, nnx.Module())
    module = getattr(module, part)
  setattr(module, leaf, value)


def get_path(module: nnx.Module, path: str) -> Any:
  for part in path.split("/"):
    module = getattr(module, part)
  return module


def option(config: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], default: Any):
  """``config[key]`` if it is of ``kinds`` (``default`` when absent or null), else an error."""
  value = config.get(key, default)
  if value is None:
    value = default
  if isinstance(kinds, type):
    kinds = (kinds,)
  if value is not default and (
    not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
  ):
    raise ConversionError(
      f"config {key} = {value!r} is not a {' or '.join(k.__name__ for k in kinds)}"
    )
  return value


def int_tuple(config: Mapping[str, Any], key: str, n: int, default: Any = None) -> tuple[int, ...]:
  """A Keras size option (``kernel_size``, ``strides``...): an int or a list of ``n`` ints."""
  value = config.get(key, default)
  if isinstance(value, int) and not isinstance(value, bool):
    value = [value] * n
  if (
    not isinstance(value, Sequence)
    or len(value) != n
    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
  ):
    raise ConversionError(f"config {key} = {value!r} is not {n} non-negative integers")
  return tuple(value)


def is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
