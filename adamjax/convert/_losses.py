"""Keras's built-in losses in JAX, with Keras's numerics, read from a model's ``compile_config``.

Each function follows ``keras/src/losses/losses.py`` op for op (and, for the crossentropies, the
JAX backend's ``keras/src/backend/jax/nn.py``), so on the same float32 inputs, op by op, it gives
Keras-JAX's bits: the same clipping (``keras.backend.epsilon()`` = 1e-7, to ``[eps, 1 - eps]``
for probabilities), the same Python-float constants folded before they meet an array, the same
reduction (:func:`reduce_weighted_values`: ``"sum_over_batch_size"`` is ``sum / size``, with a
mask turned into weights ``size / valid`` as ``keras/src/losses/loss.py``'s ``apply_mask`` does).

:func:`get` turns one ``compile_config["loss"]`` entry (a name such as ``"mse"``, a class config
``{"class_name": "Huber", "config": {...}}``, or a serialized function) into a :class:`Loss`;
:func:`compiled_loss` does what Keras's ``CompileLoss`` does for a model's outputs (one loss for
all, a list or a dict by output name, ``loss_weights``). Nothing from the config is executed:
names are looked up in :data:`FUNCTIONS` and :data:`CLASSES`.

Keras on TensorFlow differs in one documented place: its crossentropies on an output made by a
softmax or sigmoid use the logits saved on that tensor (``_get_logits`` in
``keras/src/backend/tensorflow/nn.py``), so they skip the clipping that Keras-JAX (and this
module) applies to the probabilities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError

__all__ = [
  "CLASSES",
  "EPSILON",
  "FUNCTIONS",
  "CompiledLoss",
  "Loss",
  "compiled_loss",
  "get",
  "reduce_weighted_values",
]

EPSILON = 1e-7  # keras.backend.epsilon()
REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _mean(x: jax.Array, axis: int = -1) -> jax.Array:
  # keras/src/backend/jax/numpy.py mean: accumulates in at least float32.
  return jnp.mean(x, axis=axis, dtype=jnp.result_type(x.dtype, jnp.float32))


def squeeze_or_expand_to_same_rank(x1, x2, expand_rank_1: bool = True):
  """``keras/src/losses/loss.py``: drop or add a trailing axis of 1 when the ranks differ by 1."""
  if x1.ndim == x2.ndim:
    return x1, x2
  if x1.ndim == x2.ndim + 1 and x1.shape[-1] == 1:
    if x2.ndim == 1 and expand_rank_1:
      x2 = jnp.expand_dims(x2, -1)
    else:
      x1 = jnp.squeeze(x1, -1)
  if x2.ndim == x1.ndim + 1 and x2.shape[-1] == 1:
    if x1.ndim == 1 and expand_rank_1:
      x1 = jnp.expand_dims(x1, -1)
    else:
      x2 = jnp.squeeze(x2, -1)
  return x1, x2


# ---------------------------------------------------------------------------------------------
# Per-example losses (the functions of keras/src/losses/losses.py).


def mean_squared_error(y_true, y_pred):
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  return _mean(jnp.square(y_true - y_pred))


def mean_absolute_error(y_true, y_pred):
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  return _mean(jnp.abs(y_true - y_pred))


def mean_absolute_percentage_error(y_true, y_pred):
  epsilon = jnp.asarray(EPSILON, y_pred.dtype)
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  diff = jnp.abs((y_true - y_pred) / jnp.maximum(jnp.abs(y_true), epsilon))
  return 100.0 * _mean(diff)


def mean_squared_logarithmic_error(y_true, y_pred):
  epsilon = _f32(EPSILON)
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  first_log = jnp.log(jnp.maximum(y_pred, epsilon) + 1.0)
  second_log = jnp.log(jnp.maximum(y_true, epsilon) + 1.0)
  return _mean(jnp.square(first_log - second_log))


def cosine_similarity(y_true, y_pred, axis=-1):
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)

  def normalize(x):  # keras.ops.normalize, order 2: x * min(rsqrt(sum(x^2)), 1 / eps).
    inv_norm = jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x * jnp.minimum(inv_norm, 1.0 / EPSILON)

  return -jnp.sum(normalize(y_true) * normalize(y_pred), axis=axis)


def huber(y_true, y_pred, delta=1.0):
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  delta = jnp.asarray(delta, y_pred.dtype)
  error = jnp.subtract(y_pred, y_true)
  abs_error = jnp.abs(error)
  half = jnp.asarray(0.5, abs_error.dtype)
  return _mean(
    jnp.where(
      abs_error <= delta, half * jnp.square(error), delta * abs_error - half * jnp.square(delta)
    )
  )


def log_cosh(y_true, y_pred):
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  log2 = jnp.asarray(jnp.log(_f32(2.0)), y_pred.dtype)
  x = y_pred - y_true
  return _mean(x + jax.nn.softplus(x * -2.0) - log2)


def _hinge_labels(y_true):
  """Labels in {0, 1} become {-1, 1}; any other labels are used as they are."""
  is_binary = jnp.all((y_true == 0) | (y_true == 1))
  return jnp.where(is_binary, 2.0 * y_true - 1.0, y_true)


def hinge(y_true, y_pred):
  y_true = _hinge_labels(y_true.astype(y_pred.dtype))
  return _mean(jnp.maximum(1.0 - y_true * y_pred, 0.0))


def squared_hinge(y_true, y_pred):
  y_true = _hinge_labels(y_true.astype(y_pred.dtype))
  return _mean(jnp.square(jnp.maximum(1.0 - y_true * y_pred, 0.0)))


def categorical_hinge(y_true, y_pred):
  y_true = y_true.astype(y_pred.dtype)
  pos = jnp.sum(y_true * y_pred, axis=-1)
  neg = jnp.max((1.0 - y_true) * y_pred, axis=-1)
  return jnp.maximum(neg - pos + 1.0, jnp.asarray(0.0, y_pred.dtype))


def kl_divergence(y_true, y_pred):
  y_true = y_true.astype(y_pred.dtype)
  y_true = jnp.clip(y_true, EPSILON, 1)
  y_pred = jnp.clip(y_pred, EPSILON, 1)
  return jnp.sum(y_true * jnp.log(y_true / y_pred), axis=-1)


def poisson(y_true, y_pred):
  y_true = y_true.astype(y_pred.dtype)
  epsilon = jnp.asarray(EPSILON, y_pred.dtype)
  return _mean(y_pred - y_true * jnp.log(y_pred + epsilon))


def _categorical_crossentropy(target, output, from_logits, axis):
  """``keras/src/backend/jax/nn.py`` ``categorical_crossentropy``."""
  if target.shape != output.shape:
    raise ValueError(f"target {target.shape} and output {output.shape} must have the same shape")
  if from_logits:
    log_prob = jax.nn.log_softmax(output, axis=axis)
  else:
    output = output / jnp.sum(output, axis, keepdims=True)
    output = jnp.clip(output, EPSILON, 1.0 - EPSILON)
    log_prob = jnp.log(output)
  return -jnp.sum(target * log_prob, axis=axis)


def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
  y_true = y_true.astype(y_pred.dtype)
  if label_smoothing:
    num_classes = jnp.asarray(y_true.shape[-1], y_pred.dtype)
    y_true = y_true * (1.0 - label_smoothing) + (label_smoothing / num_classes)
  return _categorical_crossentropy(y_true, y_pred, from_logits, axis)


def categorical_focal_crossentropy(
  y_true, y_pred, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0, axis=-1
):
  y_true = y_true.astype(y_pred.dtype)
  if label_smoothing:
    num_classes = jnp.asarray(y_true.shape[-1], y_pred.dtype)
    y_true = y_true * (1.0 - label_smoothing) + (label_smoothing / num_classes)
  if from_logits:
    y_pred = jax.nn.softmax(y_pred, axis=axis)
  output = y_pred / jnp.sum(y_pred, axis=axis, keepdims=True)
  output = jnp.clip(output, EPSILON, 1.0 - EPSILON)
  cce = -y_true * jnp.log(output)
  modulating_factor = jnp.power(1.0 - output, _f32(gamma))  # keras.ops.power: a tensor
  weighting_factor = jnp.multiply(modulating_factor, alpha)
  return jnp.sum(jnp.multiply(weighting_factor, cce), axis=axis)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
  """Returns the losses, or ``(losses, valid mask)`` with ``ignore_class``."""
  if y_true.ndim == y_pred.ndim and y_true.shape[axis] == 1:
    y_true = jnp.squeeze(y_true, axis=axis)
  if ignore_class is not None:
    class_axis = axis % y_pred.ndim
    res_shape = tuple(d for i, d in enumerate(y_pred.shape) if i != class_axis)
    valid_mask = jnp.not_equal(y_true, jnp.asarray(ignore_class, y_pred.dtype))
    y_true = jnp.where(valid_mask, y_true, 0)
    y_pred = jnp.where(jnp.expand_dims(valid_mask, axis), y_pred, 0)
  # keras/src/backend/jax/nn.py sparse_categorical_crossentropy.
  target = jnp.asarray(y_true, jnp.int32)
  if target.ndim == y_pred.ndim and target.shape[-1] == 1:
    target = jnp.squeeze(target, axis=-1)
  if target.shape != y_pred.shape[:-1]:
    raise ValueError(
      f"target {target.shape} and output {y_pred.shape} must have the same shape up to the last axis"
    )
  if from_logits:
    log_prob = jax.nn.log_softmax(y_pred, axis=axis)
  else:
    output = y_pred / jnp.sum(y_pred, axis, keepdims=True)
    output = jnp.clip(output, EPSILON, 1.0 - EPSILON)
    log_prob = jnp.log(output)
  res = -jnp.sum(jax.nn.one_hot(target, y_pred.shape[axis], axis=axis) * log_prob, axis=axis)
  if ignore_class is None:
    return res
  valid_mask = jnp.reshape(valid_mask, res_shape)
  return jnp.where(valid_mask, res, 0.0), valid_mask


def _binary_crossentropy(target, output, from_logits):
  """``keras/src/backend/jax/nn.py`` ``binary_crossentropy``."""
  if target.shape != output.shape:
    raise ValueError(f"target {target.shape} and output {output.shape} must have the same shape")
  if from_logits:
    log_logits = jax.nn.log_sigmoid(output)
    log_neg_logits = jax.nn.log_sigmoid(-output)
    return -1.0 * target * log_logits - (1.0 - target) * log_neg_logits
  output = jnp.clip(output, EPSILON, 1.0 - EPSILON)
  bce = target * jnp.log(output)
  bce += (1.0 - target) * jnp.log(1.0 - output)
  return -bce


def binary_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
  y_true = y_true.astype(y_pred.dtype)
  if label_smoothing:
    y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
  return _mean(_binary_crossentropy(y_true, y_pred, from_logits), axis=axis)


def binary_focal_crossentropy(
  y_true,
  y_pred,
  apply_class_balancing=False,
  alpha=0.25,
  gamma=2.0,
  from_logits=False,
  label_smoothing=0.0,
  axis=-1,
):
  y_true = y_true.astype(y_pred.dtype)
  if label_smoothing:
    y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
  if from_logits:
    y_pred = jax.nn.sigmoid(y_pred)
  bce = _binary_crossentropy(y_true, y_pred, False)
  p_t = y_true * y_pred + (1 - y_true) * (1 - y_pred)
  focal_bce = jnp.power(1.0 - p_t, _f32(gamma)) * bce
  if apply_class_balancing:
    focal_bce = (y_true * alpha + (1 - y_true) * (1 - alpha)) * focal_bce
  return _mean(focal_bce, axis=axis)


# Keras's names for them (keras/src/losses/__init__.py ALL_OBJECTS_DICT, functions and aliases).
FUNCTIONS: dict[str, Callable[..., Any]] = {
  f.__name__: f
  for f in (
    mean_squared_error,
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_logarithmic_error,
    cosine_similarity,
    huber,
    log_cosh,
    hinge,
    squared_hinge,
    categorical_hinge,
    kl_divergence,
    poisson,
    categorical_crossentropy,
    categorical_focal_crossentropy,
    sparse_categorical_crossentropy,
    binary_crossentropy,
    binary_focal_crossentropy,
  )
}
FUNCTIONS.update(
  {
    alias: FUNCTIONS[name]
    for name, aliases in {
      "binary_crossentropy": ("bce", "BCE"),
      "kl_divergence": ("kld", "KLD"),
      "mean_absolute_error": ("mae", "MAE"),
      "mean_squared_error": ("mse", "MSE"),
      "mean_absolute_percentage_error": ("mape", "MAPE"),
      "mean_squared_logarithmic_error": ("msle", "MSLE"),
    }.items()
    for alias in aliases
  }
)

# The Loss classes: (function, {constructor argument: Keras's default}), besides the base
# class's ``name``, ``reduction`` and ``dtype``.
_XENT = {"from_logits": False, "label_smoothing": 0.0, "axis": -1}
CLASSES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
  "MeanSquaredError": (mean_squared_error, {}),
  "MeanAbsoluteError": (mean_absolute_error, {}),
  "MeanAbsolutePercentageError": (mean_absolute_percentage_error, {}),
  "MeanSquaredLogarithmicError": (mean_squared_logarithmic_error, {}),
  "CosineSimilarity": (cosine_similarity, {"axis": -1}),
  "Huber": (huber, {"delta": 1.0}),
  "LogCosh": (log_cosh, {}),
  "Hinge": (hinge, {}),
  "SquaredHinge": (squared_hinge, {}),
  "CategoricalHinge": (categorical_hinge, {}),
  "KLDivergence": (kl_divergence, {}),
  "Poisson": (poisson, {}),
  "BinaryCrossentropy": (binary_crossentropy, _XENT),
  "BinaryFocalCrossentropy": (
    binary_focal_crossentropy,
    {**_XENT, "apply_class_balancing": False, "alpha": 0.25, "gamma": 2.0},
  ),
  "CategoricalCrossentropy": (categorical_crossentropy, _XENT),
  "CategoricalFocalCrossentropy": (
    categorical_focal_crossentropy,
    {**_XENT, "alpha": 0.25, "gamma": 2.0},
  ),
  "SparseCategoricalCrossentropy": (
    sparse_categorical_crossentropy,
    {"from_logits": False, "ignore_class": None, "axis": -1},
  ),
}


# ---------------------------------------------------------------------------------------------
# Reduction (keras/src/losses/loss.py).


def _apply_mask(sample_weight, mask, reduction):
  if mask is None:
    return sample_weight
  if reduction in ("mean", "sum_over_batch_size"):
    # Valid entries weigh total / valid, so that the mean over all entries is the mean over the
    # valid ones.
    total = _f32(mask.size)
    valid = jnp.sum(mask.astype(jnp.float32))
    mask_weight = jnp.where(valid == 0, 0, total / jnp.where(valid == 0, 1, valid))
    float_mask = jnp.where(mask.astype(bool), mask_weight, 0)
  else:
    float_mask = mask.astype(jnp.float32)
  if sample_weight is None:
    return float_mask
  float_mask, sample_weight = squeeze_or_expand_to_same_rank(float_mask, _f32(sample_weight))
  return sample_weight * float_mask


def reduce_weighted_values(
  values, sample_weight=None, mask=None, reduction: str | None = "sum_over_batch_size"
) -> jax.Array:
  """Keras's ``reduce_weighted_values``: mask into weights, weights applied, then reduced.

  ``"sum_over_batch_size"`` and ``"mean"`` are ``sum(values) / values.size`` (``divide_no_nan``),
  ``"mean_with_sample_weight"`` divides by the sum of the weights, ``"sum"`` sums, ``"none"``
  (or None) returns the values.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  values = _f32(values)
  sample_weight = None if sample_weight is None else _f32(sample_weight)
  sample_weight = _apply_mask(sample_weight, mask, reduction)
  if sample_weight is not None:
    values, sample_weight = squeeze_or_expand_to_same_rank(values, sample_weight)
    values = values * sample_weight
  if reduction in (None, "none") or values.shape in ((), (0,)):
    return values
  loss = jnp.sum(values)
  if reduction == "sum":
    return loss
  if reduction == "mean_with_sample_weight" and sample_weight is not None:
    divisor = jnp.sum(sample_weight).astype(loss.dtype)
  else:
    divisor = jnp.asarray(values.size, jnp.int32).astype(loss.dtype)
  return jnp.where(divisor == 0, 0, loss / jnp.where(divisor == 0, 1, divisor))


# ---------------------------------------------------------------------------------------------
# From the compile config.


@dataclasses.dataclass(frozen=True)
class Loss:
  """One Keras loss: ``loss(y_true, y_pred, sample_weight=None, mask=None)`` -> scalar.

  As Keras's ``Loss.__call__`` (through ``LossFunctionWrapper``): both arguments converted to
  float32, their ranks reconciled, the per-example function applied, then
  :func:`reduce_weighted_values` with the output's ``mask`` (a Keras mask on ``y_pred``).
  """

  name: str
  fn: Callable[..., Any]
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reduction: str | None = "sum_over_batch_size"

  def __call__(self, y_true, y_pred, sample_weight=None, mask=None) -> jax.Array:
    y_pred, y_true = _f32(y_pred), _f32(y_true)
    y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
    values = self.fn(y_true, y_pred, **self.kwargs)
    if isinstance(values, tuple):  # sparse crossentropy with ignore_class: its own mask.
      values, out_mask = values
      mask = out_mask if mask is None else (mask.astype(bool) & out_mask)
    return reduce_weighted_values(values, sample_weight, mask, self.reduction)


def _refuse(identifier: Any, why: str) -> ConversionError:
  known = sorted(set(FUNCTIONS) | set(CLASSES) | {"crossentropy", "ce"})
  return ConversionError(f"loss {str(identifier)[:200]}: {why}; the known losses are {known}")


def get(identifier: Any, y_true: Any = None, y_pred: Any = None) -> Loss:
  """The :class:`Loss` for one ``compile_config["loss"]`` entry.

  Args:
    identifier: A Keras loss name (``"mse"``, ``"sparse_categorical_crossentropy"``,
      ``"MeanSquaredError"``...), a serialized class ``{"class_name": "Huber", "config":
      {...}}`` or a serialized function ``{"class_name": "function", "config": "mse"}``.
    y_true, y_pred: Shapes (anything with ``.shape``) of one batch, needed only for
      ``"crossentropy"``/``"ce"``, which Keras resolves from them.

  Raises:
    ConversionError: for a loss this module does not reproduce (custom, CTC, Dice, ...) or a
      config option it does not know; the message lists the known losses.
  """
  if isinstance(identifier, str):
    if identifier.lower() in ("crossentropy", "ce"):
      if y_true is None or y_pred is None:
        raise _refuse(identifier, "needs the output and label shapes to resolve")
      t, p = tuple(y_true.shape), tuple(y_pred.shape)
      if p[-1] == 1:
        fn = binary_crossentropy
      elif len(t) < len(p) or (t[-1] == 1 and p[-1] > 1):
        fn = sparse_categorical_crossentropy
      else:
        fn = categorical_crossentropy
      return Loss(identifier, fn)
    if identifier in FUNCTIONS:
      return Loss(identifier, FUNCTIONS[identifier])
    if identifier in CLASSES:
      fn, defaults = CLASSES[identifier]
      return Loss(identifier, fn, dict(defaults))
    raise _refuse(identifier, "not a Keras built-in loss this module reproduces")
  if not isinstance(identifier, dict) or not isinstance(identifier.get("class_name"), str):
    raise _refuse(identifier, "not a loss name or a serialized Keras loss")
  class_name = identifier["class_name"]
  config = identifier.get("config")
  if class_name == "function":
    if not isinstance(config, str) or config not in FUNCTIONS:
      raise _refuse(config, "not a Keras built-in loss function this module reproduces")
    return Loss(config, FUNCTIONS[config])
  if class_name not in CLASSES or identifier.get("module", "keras.losses") != "keras.losses":
    raise _refuse(class_name, "not a Keras built-in loss class this module reproduces")
  if identifier.get("registered_name") not in (None, class_name):
    raise _refuse(class_name, f"registered as {identifier['registered_name']!r}, a custom class")
  config = dict(config or {})
  fn, defaults = CLASSES[class_name]
  name = config.pop("name", class_name)
  reduction = config.pop("reduction", "sum_over_batch_size")
  if reduction not in REDUCTIONS:
    raise _refuse(class_name, f"reduction {reduction!r} is not one of {REDUCTIONS}")
  if config.pop("dtype", None) not in (None, "float32"):
    raise _refuse(class_name, "a loss dtype other than float32")
  unknown = sorted(set(config) - set(defaults))
  if unknown:
    raise _refuse(class_name, f"options {unknown} are not {class_name}'s")
  return Loss(str(name), fn, {**defaults, **config}, reduction)


@dataclasses.dataclass(frozen=True)
class CompiledLoss:
  """Keras's ``CompileLoss``: the weighted sum over outputs of each output's loss.

  ``losses[i]`` is output ``i``'s :class:`Loss` (None: that output has no loss) and
  ``weights[i]`` its ``loss_weights`` entry (None: not multiplied).
  """

  losses: tuple[Loss | None, ...]
  weights: tuple[float | None, ...]

  def __call__(self, y_true: Sequence[Any], y_pred: Sequence[Any], masks=None) -> jax.Array:
    masks = masks if masks is not None else [None] * len(y_pred)
    values = []
    for loss, weight, t, p, m in zip(self.losses, self.weights, y_true, y_pred, masks, strict=True):
      if loss is None:
        continue
      value = loss(t, p, mask=m)
      values.append(value if weight is None else value * weight)
    if not values:
      raise ValueError("no output has a loss")
    return sum(values[1:], values[0])


def compiled_loss(
  compile_config: Mapping[str, Any],
  output_names: Sequence[str],
  y_true: Sequence[Any] = (),
  y_pred: Sequence[Any] = (),
) -> CompiledLoss:
  """The model's compiled loss from its ``compile_config`` (``loss`` and ``loss_weights``).

  Args:
    compile_config: A Keras 3 ``config.json``'s ``compile_config``.
    output_names: The model's output layer names, in output order (dict losses are keyed so).
    y_true, y_pred: One batch's labels and outputs (or their shapes), for ``"crossentropy"``.

  Raises:
    ConversionError: for no loss, a structure that does not fit the outputs, or a loss
      :func:`get` refuses.
  """
  n = len(output_names)
  loss = compile_config.get("loss")
  weights = compile_config.get("loss_weights")
  if loss is None:
    raise ConversionError("the model was compiled without a loss (compile_config.loss is null)")

  def per_output(value: Any, what: str) -> list[Any]:
    if isinstance(value, dict) and "class_name" not in value:
      if set(value) - set(output_names):
        raise ConversionError(
          f"{what} keys {sorted(value)} are not the model's outputs {list(output_names)}"
        )
      return [value.get(name) for name in output_names]
    if isinstance(value, list):
      if len(value) != n:
        raise ConversionError(f"{what} has {len(value)} entries for {n} outputs")
      return value
    return [value] * n

  shapes = lambda xs: list(xs) + [None] * (n - len(xs))  # noqa: E731
  losses = tuple(
    None if entry is None else get(entry, t, p)
    for entry, t, p in zip(per_output(loss, "loss"), shapes(y_true), shapes(y_pred), strict=True)
  )
  if weights is None:
    flat_weights: list[Any] = [None] * n
  elif isinstance(weights, (int, float)) and n == 1:
    flat_weights = [weights]
  else:
    flat_weights = per_output(weights, "loss_weights")
  if not all(w is None or isinstance(w, (int, float)) for w in flat_weights):
    raise ConversionError(f"loss_weights {str(weights)[:200]} are not numbers")
  return CompiledLoss(losses, tuple(None if w is None else float(w) for w in flat_weights))
