"""Keras's attention layers: MultiHeadAttention, Attention, AdditiveAttention
(``keras/src/layers/attention``), with the operations the Keras JAX backend runs, in its order.

MultiHeadAttention takes one of two paths, exactly as Keras's ``_compute_attention`` does:

- without dropout, without ``return_attention_scores`` and with rank-3 inputs (4-D projections),
  Keras calls ``ops.dot_product_attention``. Its JAX backend (``keras/src/backend/jax/nn.py``)
  asks ``_can_use_flash_attention``: never on CPU (no cuDNN); on GPU only for float16/bfloat16
  projections with cuDNN, compute capability >= 8.0 and a head size that is a multiple of 8 (at
  most 256 on Hopper, 128 before), then cuDNN's fused kernel; on TPU always (the Splash kernel).
  Otherwise it calls ``jax.nn.dot_product_attention(..., implementation="xla")``. This module
  always makes that ``xla`` call: the same function as Keras on CPU and on GPU in float32; where
  Keras takes a fused kernel, the results differ by that kernel's rounding;
- otherwise the explicit path: scaled query, ``einsum``, Keras's masked ``Softmax`` layer over the
  attention axes, ``Dropout`` in training, ``einsum``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register
from adamjax.convert.layers.einsum_dense import add_bias

# Keras's MultiHeadAttention sub-layers, as its h5 file names their groups (``_gate_dense`` has no
# public property in Keras, so its group keeps the underscore).
_PROJECTIONS = ("query_dense", "key_dense", "_gate_dense", "value_dense", "output_dense")
_MAX_RANK = 12  # einsum letters: Keras's equations use at most 2 * rank of them
_MAX_OUTPUT_DIMS = 8


def keras_dropout(x: jax.Array, rate: float, rngs: Any) -> jax.Array:
  """``keras/src/backend/jax/random.py`` ``dropout`` (no noise shape), with a key from ``rngs``."""
  if rate == 1.0:
    return jnp.zeros_like(x)
  if rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout in training needs rngs with a 'dropout' stream (nnx.Rngs)")
  keep_prob = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), p=keep_prob, shape=x.shape)
  return jax.lax.select(mask, x / keep_prob, jnp.zeros_like(x))


def _expand_to(x: jax.Array, ndim: int) -> jax.Array:
  """Leading unit axes up to ``ndim`` (what implicit rank promotion does, made explicit)."""
  return jnp.reshape(x, (1,) * (ndim - x.ndim) + x.shape) if x.ndim < ndim else x


def _and(a: jax.Array, b: jax.Array) -> jax.Array:
  ndim = max(a.ndim, b.ndim)
  return jnp.logical_and(_expand_to(a, ndim), _expand_to(b, ndim))


def _rate(config) -> float:
  rate = option(config, "dropout", (int, float), 0.0)
  if not 0.0 <= rate <= 1.0:
    raise ConversionError(f"config dropout = {rate!r} is not in [0, 1]")
  return float(rate)


def _positive_int(config, key, default=None) -> int:
  value = option(config, key, int, default)
  if value is None or value <= 0:
    raise ConversionError(f"config {key} = {value!r} is not a positive integer")
  return value


def _letters(n: int) -> str:
  if n > len(string.ascii_lowercase):
    raise ValueError(f"an einsum over {n} axes needs more than 26 letters")
  return string.ascii_lowercase[:n]


def _proj_equation(free_dims: int, bound_dims: int, output_dims: int) -> str:
  """Keras's ``_build_proj_equation``."""
  letters = _letters(free_dims + bound_dims + output_dims)
  free = letters[:free_dims]
  bound = letters[free_dims : free_dims + bound_dims]
  out = letters[free_dims + bound_dims :]
  return f"{free}{bound},{bound}{out}->{free}{out}"


def _attention_equations(rank: int, attn_axes: tuple[int, ...]) -> tuple[str, str, int]:
  """Keras's ``_build_attention_equation``: (dot product, combine, rank of the scores)."""
  target = _letters(rank)
  batch_dims = tuple(np.delete(range(rank), attn_axes + (rank - 1,)))
  offset = rank
  source = ""
  for i in range(rank):
    if i in batch_dims or i == rank - 1:
      source += target[i]
    else:
      source += string.ascii_lowercase[offset]
      offset += 1
  product = "".join(
    [target[i] for i in batch_dims]
    + [target[i] for i in attn_axes]
    + [source[i] for i in attn_axes]
  )
  return f"{source},{target}->{product}", f"{product},{source}->{target}", len(product)


def keras_masked_softmax(scores: jax.Array, mask: Any, axes: tuple[int, ...]) -> jax.Array:
  """``keras/src/layers/activations/softmax.py`` ``Softmax(axis=axes)(scores, mask=mask)``."""
  if mask is not None:
    if mask.dtype != jnp.bool_:
      mask = jnp.greater(mask, jnp.asarray(0.5, dtype=mask.dtype))
    large_negative = -3e4 if scores.dtype == jnp.float16 else -1e9
    scores = jnp.where(mask, scores, large_negative)
  if len(axes) > 1:
    out = jnp.exp(scores - jax.scipy.special.logsumexp(scores, axis=axes, keepdims=True))
  else:
    out = jax.nn.softmax(scores, axis=axes[0])
  if mask is not None:
    out = jnp.where(mask, out, 0.0)
  return out


def _causal_mask(q_len: int, v_len: int) -> jax.Array:
  """Keras's ``_compute_causal_mask``: ``(1, T, S)``, True where row >= column."""
  ones = jnp.ones((1, q_len, v_len), dtype="int32")
  return jnp.greater_equal(jnp.cumsum(ones, axis=-2), jnp.cumsum(ones, axis=-1))


@register("MultiHeadAttention")
class MultiHeadAttention(Layer):
  """``keras/src/layers/attention/multi_head_attention.py``.

  Called as Keras calls it: ``layer(query, value, key=None, query_mask=..., value_mask=...,
  key_mask=..., attention_mask=..., return_attention_scores=..., use_causal_mask=...,
  training=..., rngs=...)``. ``query_mask``/``value_mask``/``key_mask`` are the masks the graph
  propagates to those inputs; the output carries the query's mask.
  """

  supports_masking = True
  call_args = ("query", "value", "key")

  @classmethod
  def variables(cls, config):
    parts = ("kernel", "bias") if config.get("use_bias", True) else ("kernel",)
    gate = bool(config.get("use_gate", False))
    return tuple(
      f"{dense}/{part}"
      for dense in _PROJECTIONS
      if dense != "_gate_dense" or gate
      for part in parts
    )

  def __init__(self, config, weights):
    super().__init__(config, weights)
    if self.activity_regularizer is not None:
      # Keras hands it to the four projections (``_get_common_kwargs_for_sublayer``), whose
      # outputs stay inside this module: the penalty cannot be added as Keras adds it.
      raise ConversionError(
        "MultiHeadAttention activity_regularizer applies to its query/key/value/output "
        "projections' outputs, which the converted module does not expose"
      )
    self.num_heads = _positive_int(config, "num_heads")
    self.key_dim = _positive_int(config, "key_dim")
    self.value_dim = _positive_int(config, "value_dim", self.key_dim)
    self.dropout = _rate(config)
    self.use_bias = option(config, "use_bias", bool, True)
    self.use_gate = option(config, "use_gate", bool, False)
    output_shape = config.get("output_shape")
    if isinstance(output_shape, int) and not isinstance(output_shape, bool):
      output_shape = (output_shape,)
    if output_shape is not None and (
      not isinstance(output_shape, Sequence)
      or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in output_shape)
    ):
      raise ConversionError(f"config output_shape = {output_shape!r} is not positive integers")
    # Keras treats an empty output_shape as none (``if output_shape:``).
    self.output_dims = len(output_shape) if output_shape else None
    axes = config.get("attention_axes")
    if isinstance(axes, int) and not isinstance(axes, bool):
      axes = (axes,)
    if axes is not None and (
      not isinstance(axes, Sequence)
      or not axes
      or len(axes) > _MAX_RANK
      or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
    ):
      raise ConversionError(f"config attention_axes = {axes!r} is not a list of integers")
    self.attention_axes = None if axes is None else tuple(axes)
    window = config.get("sliding_window")
    self.sliding_window = None if window is None else _positive_int(config, "sliding_window")
    if config.get("flash_attention"):
      raise ConversionError("config flash_attention = True is not supported")
    self.inverse_sqrt_key_dim = 1.0 / math.sqrt(float(self.key_dim))
    # The file's arrays against the config: (input, heads, dim) projections, an output kernel
    # (heads, value_dim, *output_shape), biases of the kernels' output shapes.
    expected = {
      "query_dense": (self.num_heads, self.key_dim),
      "key_dense": (self.num_heads, self.key_dim),
      "value_dense": (self.num_heads, self.value_dim),
    }
    if self.use_gate:
      expected["_gate_dense"] = (self.num_heads, self.value_dim)
    for dense, heads_dim in expected.items():
      kernel = getattr(self, dense).kernel[...].shape
      if len(kernel) != 3 or kernel[1:] != heads_dim:
        raise ConversionError(f"{dense} kernel of shape {kernel} does not fit num_heads, key_dim")
      if self.use_bias and getattr(self, dense).bias[...].shape != heads_dim:
        raise ConversionError(f"{dense} bias does not fit num_heads, key_dim")
    kernel = self.output_dense.kernel[...].shape
    if (
      kernel[:2] != (self.num_heads, self.value_dim)
      or len(kernel) > 2 + _MAX_OUTPUT_DIMS
      or (self.output_dims is not None and len(kernel) != 2 + self.output_dims)
      or (self.use_bias and self.output_dense.bias[...].shape != kernel[2:])
    ):
      raise ConversionError(f"output_dense kernel of shape {kernel} does not fit the config")

  def _project(self, dense: str, x: jax.Array, equation: str, activation=None) -> jax.Array:
    """One of Keras's ``EinsumDense`` sub-layers."""
    sub = getattr(self, dense)
    x = jnp.einsum(equation, x, self.cast(sub.kernel[...]), preferred_element_type=None)
    if self.use_bias:
      x = add_bias(x, self.cast(sub.bias[...]))
    return x if activation is None else activation(x)

  def _attention_mask(self, query, value, query_mask, value_mask, key_mask, attention_mask, causal):
    """Keras's ``_compute_attention_mask``."""
    auto_mask = None
    if query_mask is not None:
      auto_mask = jnp.expand_dims(query_mask.astype("bool"), -1)  # [B, T, 1]
    for other in (value_mask, key_mask):
      if other is not None:
        mask = jnp.expand_dims(other.astype("bool"), -2)  # [B, 1, S]
        auto_mask = mask if auto_mask is None else _and(auto_mask, mask)
    if causal:
      mask = _causal_mask(query.shape[1], value.shape[1])
      auto_mask = mask if auto_mask is None else _and(auto_mask, mask)
    if self.sliding_window is not None:
      rows = jnp.reshape(jnp.arange(query.shape[1], dtype="int32"), (1, query.shape[1], 1))
      cols = jnp.reshape(jnp.arange(value.shape[1], dtype="int32"), (1, 1, value.shape[1]))
      mask = jnp.less(jnp.abs(rows - cols), self.sliding_window)
      auto_mask = mask if auto_mask is None else _and(auto_mask, mask)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask).astype("bool")
    if auto_mask is not None:
      attention_mask = auto_mask if attention_mask is None else _and(attention_mask, auto_mask)
    return attention_mask

  def _expand_mask(self, mask: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array:
    for _ in range(ndim - mask.ndim):
      mask = jnp.expand_dims(mask, axis=-len(axes) * 2 - 1)
    return mask

  def __call__(
    self,
    query,
    value,
    key=None,
    *,
    query_mask=None,
    value_mask=None,
    key_mask=None,
    attention_mask=None,
    return_attention_scores=False,
    use_causal_mask=False,
    training=False,
    mask=None,
    rngs=None,
  ):
    del mask  # Keras's MultiHeadAttention takes its masks per input (query_mask, ...).
    if key is None:
      key = value
    rank = query.ndim + 1  # of the projected tensors
    if not 3 <= rank <= _MAX_RANK or value.ndim + 1 != rank or key.ndim + 1 != rank:
      raise ValueError(f"query {query.shape}, value {value.shape}, key {key.shape}: ranks differ")
    if self.attention_axes is None:
      axes = tuple(range(1, rank - 2))
    else:
      axes = tuple(a if a >= 0 else (rank - 1) + a for a in self.attention_axes)
      if not all(0 < a < rank - 2 for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"attention_axes {self.attention_axes} do not fit rank {rank - 1} inputs")
    dot_equation, combine_equation, scores_rank = _attention_equations(rank, axes)
    norm_axes = tuple(range(scores_rank - len(axes), scores_rank))

    causal_only = (
      use_causal_mask
      and query_mask is None
      and value_mask is None
      and key_mask is None
      and attention_mask is None
      and self.sliding_window is None
    )
    if not causal_only:
      attention_mask = self._attention_mask(
        query, value, query_mask, value_mask, key_mask, attention_mask, use_causal_mask
      )
    else:
      attention_mask = None

    qkv_equation = _proj_equation(rank - 2, 1, 2)
    if self.use_gate:
      gate = self._project("_gate_dense", query, qkv_equation, jax.nn.sigmoid)
    q = self._project("query_dense", query, qkv_equation)
    k = self._project("key_dense", key, qkv_equation)
    v = self._project("value_dense", value, qkv_equation)

    use_dot_product_attention = not (self.dropout > 0.0 or return_attention_scores or rank != 4)
    scores = None
    if use_dot_product_attention:
      # keras/src/backend/jax/nn.py dot_product_attention: without flash attention (no cuDNN or
      # TPU), jax.nn.dot_product_attention with the "xla" implementation.
      if attention_mask is not None:
        attention_mask = self._expand_mask(attention_mask, 4, axes).astype("bool")
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=None,
        mask=attention_mask,
        scale=self.inverse_sqrt_key_dim,
        is_causal=causal_only,
        implementation="xla",
      )
    else:
      if causal_only:
        attention_mask = _causal_mask(q.shape[1], v.shape[1])
      q = jnp.multiply(q, jnp.asarray(self.inverse_sqrt_key_dim, dtype=q.dtype))
      scores = jnp.einsum(dot_equation, k, q, preferred_element_type=None)
      if attention_mask is not None:
        attention_mask = self._expand_mask(attention_mask, scores.ndim, axes)
      scores = keras_masked_softmax(scores, attention_mask, norm_axes)
      final_scores = scores
      if self.dropout > 0.0 and training:
        final_scores = keras_dropout(scores, self.dropout, rngs)
      out = jnp.einsum(combine_equation, final_scores, v, preferred_element_type=None)

    if self.use_gate:
      out = jnp.multiply(out, gate)
    out_free = rank - 2  # the output projection: (free..., heads, dim) -> (free..., out...)
    out_dims = self.output_dense.kernel[...].ndim - 2
    out = self._project("output_dense", out, _proj_equation(out_free, 2, out_dims))
    if return_attention_scores:
      return out, scores
    return out

  def compute_mask(self, inputs, mask):
    """The query's mask (Keras's default ``compute_mask`` on the first argument)."""
    del inputs
    if isinstance(mask, (list, tuple)):
      return mask[0] if mask else None
    return mask


class _BaseDenseAttention(Layer):
  """What Attention and AdditiveAttention share (``keras/src/layers/attention/attention.py``)."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.use_scale = option(config, "use_scale", bool, self.default_use_scale)
    self.dropout = _rate(config)

  default_use_scale = False

  def _scores(self, query, key):
    raise NotImplementedError

  def __call__(
    self,
    inputs,
    *,
    mask=None,
    training=False,
    return_attention_scores=False,
    use_causal_mask=False,
    rngs=None,
  ):
    if not isinstance(inputs, (list, tuple)) or not 2 <= len(inputs) <= 3:
      raise ValueError("Attention layers take a list [query, value] or [query, value, key]")
    if mask is not None and (not isinstance(mask, (list, tuple)) or not 2 <= len(mask) <= 3):
      raise ValueError("Attention layers take a mask list [query_mask, value_mask]")
    q, v = inputs[0], inputs[1]
    k = inputs[2] if len(inputs) > 2 else v
    q_mask = mask[0] if mask else None
    v_mask = mask[1] if mask else None
    scores = self._scores(q, k)
    # _calculate_score_mask
    if use_causal_mask:
      causal = _causal_mask(scores.shape[-2], scores.shape[-1])
      if v_mask is not None:
        scores_mask = _and(jnp.expand_dims(v_mask, axis=-2), causal)
      else:
        scores_mask = causal
    else:
      scores_mask = v_mask
    # _apply_scores
    if scores_mask is not None:
      padding_mask = jnp.logical_not(scores_mask)
      max_value = 65504.0 if scores.dtype == jnp.float16 else 1.0e9
      if padding_mask.ndim == 2:
        padding_mask = jnp.expand_dims(padding_mask, axis=-2)
      scores = jnp.where(_expand_to(padding_mask, scores.ndim), scores - max_value, scores)
    weights = jax.nn.softmax(scores, axis=-1)
    if training and self.dropout > 0:
      weights = keras_dropout(weights, self.dropout, rngs)
    out = jnp.matmul(weights, v, preferred_element_type=None)
    if q_mask is not None:
      q_mask = jnp.expand_dims(q_mask, axis=-1)
      out = jnp.where(_expand_to(q_mask, out.ndim), out, 0)
    if return_attention_scores:
      return out, weights
    return out

  def compute_mask(self, inputs, mask):
    del inputs
    if mask is None or mask[0] is None:
      return None
    return mask[0]


@register("Attention")
class Attention(_BaseDenseAttention):
  """``keras/src/layers/attention/attention.py``: Luong-style (``dot``) or ``concat`` scores."""

  @classmethod
  def variables(cls, config):
    names = ("scale",) if config.get("use_scale", False) else ()
    return names + (("concat_score_weight",) if config.get("score_mode") == "concat" else ())

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.score_mode = option(config, "score_mode", str, "dot")
    if self.score_mode not in ("dot", "concat"):
      raise ConversionError(f"config score_mode = {self.score_mode!r} is not dot or concat")

  def _scores(self, query, key):
    if self.score_mode == "dot":
      scores = jnp.matmul(query, jnp.swapaxes(key, -2, -1), preferred_element_type=None)
      if self.use_scale:
        scores = jnp.multiply(scores, self.cast(self.scale[...]))
      return scores
    summed = jnp.expand_dims(query, axis=-2) + jnp.expand_dims(key, axis=-3)
    if self.use_scale:
      summed = jnp.multiply(self.cast(self.scale[...]), summed)
    return jnp.multiply(
      self.cast(self.concat_score_weight[...]), jnp.sum(jnp.tanh(summed), axis=-1)
    )


@register("AdditiveAttention")
class AdditiveAttention(_BaseDenseAttention):
  """``keras/src/layers/attention/additive_attention.py``: Bahdanau-style scores."""

  default_use_scale = True

  @classmethod
  def variables(cls, config):
    return ("scale",) if config.get("use_scale", True) else ()

  def _scores(self, query, key):
    tanh = jnp.tanh(jnp.expand_dims(query, axis=-2) + jnp.expand_dims(key, axis=-3))
    if self.use_scale:
      scaled = jnp.multiply(_expand_to(self.cast(self.scale[...]), tanh.ndim), tanh)
    else:
      scaled = 1.0 * tanh
    return jnp.sum(scaled, axis=-1)
