"""Keras's convolution layers (``keras/src/layers/convolutional``): Conv1D/2D/3D, their Transpose
versions, DepthwiseConv1D/2D and SeparableConv1D/2D.

The arithmetic is ``keras/src/backend/jax/nn.py`` (``conv``, ``depthwise_conv``,
``separable_conv``, ``conv_transpose``) with the same ``lax`` calls, dimension numbers, kernel
reshapes and transpose padding (``keras/src/backend/common/backend_utils.py``), followed by the
bias add and activation of the layer's ``call``; under ``jax.jit`` the outputs are bit-identical
to Keras on the JAX backend.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, int_tuple, option, register
from adamjax.convert.layers.activations import get_activation

DATA_FORMATS = ("channels_last", "channels_first")


def data_format_option(config) -> str:
  """Keras's ``data_format`` (``standardize_data_format``): channels_last when absent."""
  value = option(config, "data_format", str, "channels_last").lower()
  if value not in DATA_FORMATS:
    raise ConversionError(f"config data_format = {value!r} is not one of {DATA_FORMATS}")
  return value


def padding_option(config, allowed: tuple[str, ...]) -> str:
  """Keras's ``padding`` (``standardize_padding``: case-insensitive)."""
  value = option(config, "padding", str, "valid").lower()
  if value not in allowed:
    raise ConversionError(f"config padding = {value!r} is not one of {allowed}")
  return value


def positive_tuple(config, key: str, n: int, default: Any = None) -> tuple[int, ...]:
  value = int_tuple(config, key, n, default)
  if not all(value):
    raise ConversionError(f"config {key} = {list(value)} has a zero")
  return value


def positive_int(config, key: str, default: Any = None) -> int:
  value = option(config, key, int, default)
  if value is None or value <= 0:
    raise ConversionError(f"config {key} = {value!r} is not a positive integer")
  return value


def check_shape(name: str, array: jax.Array, expected: tuple[int | None, ...]) -> None:
  """A weight's shape against what the config implies (``None``: any size)."""
  shape = tuple(array.shape)
  if len(shape) != len(expected) or any(
    e is not None and s != e for s, e in zip(shape, expected, strict=True)
  ):
    want = tuple("?" if e is None else e for e in expected)
    raise ConversionError(f"weight {name} has shape {shape}, the config implies {want}")


def dimension_numbers(rank: int, data_format: str) -> jax.lax.ConvDimensionNumbers:
  """``_convert_to_lax_conv_dimension_numbers(rank, data_format, transpose=False)``."""
  num_dims = rank + 2
  if data_format == "channels_last":
    spatial = tuple(range(1, num_dims - 1))
    inputs_dn = (0, num_dims - 1) + spatial
  else:
    spatial = tuple(range(2, num_dims))
    inputs_dn = (0, 1) + spatial
  kernel_dn = (num_dims - 1, num_dims - 2) + tuple(range(num_dims - 2))
  return jax.lax.ConvDimensionNumbers(lhs_spec=inputs_dn, rhs_spec=kernel_dn, out_spec=inputs_dn)


def channels(x: jax.Array, data_format: str) -> int:
  return x.shape[-1] if data_format == "channels_last" else x.shape[1]


def conv(x, kernel, strides, padding, data_format, dilation_rate):
  """Keras JAX ``nn.conv``: groups come from the input's and the kernel's channel counts."""
  kernel_in = kernel.shape[-2]
  if channels(x, data_format) % kernel_in:
    raise ValueError(
      f"input channels {channels(x, data_format)} are not a multiple of the kernel's {kernel_in}"
    )
  x = jnp.asarray(x, dtype=kernel.dtype)
  out = jax.lax.conv_general_dilated(
    x,
    kernel,
    strides,
    padding,
    rhs_dilation=dilation_rate,
    dimension_numbers=dimension_numbers(x.ndim - 2, data_format),
    feature_group_count=channels(x, data_format) // kernel_in,
  )
  if out.size == 0 and x.size != 0:
    raise ValueError(f"convolution of an input of shape {x.shape} gives an empty output")
  return out


def depthwise_conv(x, kernel, strides, padding, data_format, dilation_rate):
  """Keras JAX ``nn.depthwise_conv``: one group per input channel."""
  groups = channels(x, data_format)
  if groups != kernel.shape[-2]:
    raise ValueError(f"input has {groups} channels, the depthwise kernel {kernel.shape[-2]}")
  kernel = jnp.reshape(kernel, kernel.shape[:-2] + (1, groups * kernel.shape[-1]))
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    strides,
    padding,
    rhs_dilation=dilation_rate,
    dimension_numbers=dimension_numbers(x.ndim - 2, data_format),
    feature_group_count=groups,
  )


def transpose_padding(kernel_size, stride, dilation_rate, padding, output_padding):
  """``_convert_conv_transpose_padding_args_from_keras_to_jax`` for one spatial axis."""
  kernel_size = (kernel_size - 1) * dilation_rate + 1
  if padding == "valid":
    if output_padding is None:
      output_padding = max(kernel_size, stride) - kernel_size
    return kernel_size - 1, kernel_size - 1 + output_padding
  if output_padding is None:
    pad_len = stride + kernel_size - 2
  else:
    pad_len = kernel_size + kernel_size % 2 - 2 + output_padding
  left = min(pad_len // 2 + pad_len % 2, kernel_size - 1)
  return left, pad_len - left


class _Convolution(Layer):
  """What every convolution layer shares: options, bias add, activation."""

  rank: ClassVar[int]
  causal: ClassVar[bool] = False  # Conv1D alone takes padding="causal"
  kernel_names: ClassVar[tuple[str, ...]] = ("kernel",)

  @classmethod
  def variables(cls, config):
    if config.get("lora_rank"):
      raise ConversionError("config lora_rank: LoRA-enabled convolutions are not supported")
    use_bias = option(config, "use_bias", bool, True)
    return cls.kernel_names + (("bias",) if use_bias else ())

  def __init__(self, config, weights):
    super().__init__(config, weights)
    rank = self.rank
    self.kernel_size = positive_tuple(config, "kernel_size", rank)
    self.strides = positive_tuple(config, "strides", rank, 1)
    self.dilation_rate = positive_tuple(config, "dilation_rate", rank, 1)
    if max(self.strides) > 1 and max(self.dilation_rate) > 1:
      raise ConversionError(
        f"config strides = {list(self.strides)} with dilation_rate = "
        f"{list(self.dilation_rate)}: Keras does not support both above 1"
      )
    allowed = ("valid", "same", "causal") if self.causal else ("valid", "same")
    self.padding = padding_option(config, allowed)
    self.data_format = data_format_option(config)
    self.use_bias = option(config, "use_bias", bool, True)
    self.activation = get_activation(config.get("activation"))

  def add_bias_and_activate(self, outputs):
    if self.use_bias:
      bias = self.cast(self.bias[...])
      n = bias.shape[0]
      if self.data_format == "channels_last":
        shape = (1,) * (self.rank + 1) + (n,)
      else:
        shape = (1, n) + (1,) * self.rank
      outputs = jnp.add(outputs, jnp.reshape(bias, shape))
    return self.activation(outputs)


class _Conv(_Convolution):
  """``keras/src/layers/convolutional/base_conv.py``: ``activation(conv(x, kernel) + bias)``."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.filters = positive_int(config, "filters")
    self.groups = positive_int(config, "groups", 1)
    if self.filters % self.groups:
      raise ConversionError(
        f"config filters = {self.filters} is not a multiple of groups = {self.groups}"
      )
    check_shape("kernel", self.kernel[...], self.kernel_size + (None, self.filters))
    if self.use_bias:
      check_shape("bias", self.bias[...], (self.filters,))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    padding = self.padding
    if padding == "causal":  # conv1d.py: left-pad the time axis, then a valid convolution
      left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
      pads = [[0, 0], [left, 0], [0, 0]]
      if self.data_format == "channels_first":
        pads = [[0, 0], [0, 0], [left, 0]]
      inputs = jnp.pad(inputs, pads, mode="constant")
      padding = "valid"
    kernel = self.cast(self.kernel[...])
    if channels(inputs, self.data_format) != kernel.shape[-2] * self.groups:
      raise ValueError(
        f"input has {channels(inputs, self.data_format)} channels; the kernel takes "
        f"{kernel.shape[-2]} per group in {self.groups} groups"
      )
    outputs = conv(inputs, kernel, self.strides, padding, self.data_format, self.dilation_rate)
    return self.add_bias_and_activate(outputs)


@register("Conv1D")
class Conv1D(_Conv):
  """``keras/src/layers/convolutional/conv1d.py`` (padding ``causal`` as Keras pads it)."""

  rank = 1
  causal = True


@register("Conv2D")
class Conv2D(_Conv):
  """``keras/src/layers/convolutional/conv2d.py``."""

  rank = 2


@register("Conv3D")
class Conv3D(_Conv):
  """``keras/src/layers/convolutional/conv3d.py``."""

  rank = 3


class _ConvTranspose(_Convolution):
  """``keras/src/layers/convolutional/base_conv_transpose.py``: ``lax.conv_transpose`` with
  ``transpose_kernel=True`` and Keras's explicit per-axis padding; kernel is
  ``kernel_size + (filters, input channels)``."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.filters = positive_int(config, "filters")
    self.output_padding = None
    if config.get("output_padding") is not None:
      self.output_padding = int_tuple(config, "output_padding", self.rank)
      for op, s in zip(self.output_padding, self.strides, strict=True):
        if op >= s:
          raise ConversionError(
            f"config output_padding = {list(self.output_padding)} is not below strides = "
            f"{list(self.strides)}"
          )
    check_shape("kernel", self.kernel[...], self.kernel_size + (self.filters, None))
    if self.use_bias:
      check_shape("bias", self.bias[...], (self.filters,))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    kernel = self.cast(self.kernel[...])
    if channels(inputs, self.data_format) != kernel.shape[-1]:
      raise ValueError(
        f"input has {channels(inputs, self.data_format)} channels, the kernel {kernel.shape[-1]}"
      )
    pads = [
      transpose_padding(
        self.kernel_size[i],
        self.strides[i],
        self.dilation_rate[i],
        self.padding,
        None if self.output_padding is None else self.output_padding[i],
      )
      for i in range(self.rank)
    ]
    outputs = jax.lax.conv_transpose(
      inputs,
      kernel,
      self.strides,
      padding=pads,
      rhs_dilation=self.dilation_rate,
      dimension_numbers=dimension_numbers(self.rank, self.data_format),
      transpose_kernel=True,
    )
    return self.add_bias_and_activate(outputs)


@register("Conv1DTranspose")
class Conv1DTranspose(_ConvTranspose):
  """``keras/src/layers/convolutional/conv1d_transpose.py``."""

  rank = 1


@register("Conv2DTranspose")
class Conv2DTranspose(_ConvTranspose):
  """``keras/src/layers/convolutional/conv2d_transpose.py``."""

  rank = 2


@register("Conv3DTranspose")
class Conv3DTranspose(_ConvTranspose):
  """``keras/src/layers/convolutional/conv3d_transpose.py``."""

  rank = 3


class _DepthwiseConv(_Convolution):
  """``keras/src/layers/convolutional/base_depthwise_conv.py``: kernel is
  ``kernel_size + (input channels, depth_multiplier)``, bias ``depth_multiplier * channels``."""

  option_names = {"kernel": "depthwise"}  # depthwise_regularizer, depthwise_constraint

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.depth_multiplier = positive_int(config, "depth_multiplier", 1)
    check_shape("kernel", self.kernel[...], self.kernel_size + (None, self.depth_multiplier))
    if self.use_bias:
      check_shape("bias", self.bias[...], (self.kernel[...].shape[-2] * self.depth_multiplier,))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    kernel = self.cast(self.kernel[...])
    outputs = depthwise_conv(
      inputs, kernel, self.strides, self.padding, self.data_format, self.dilation_rate
    )
    return self.add_bias_and_activate(outputs)


@register("DepthwiseConv1D")
class DepthwiseConv1D(_DepthwiseConv):
  """``keras/src/layers/convolutional/depthwise_conv1d.py``."""

  rank = 1


@register("DepthwiseConv2D")
class DepthwiseConv2D(_DepthwiseConv):
  """``keras/src/layers/convolutional/depthwise_conv2d.py``."""

  rank = 2


class _SeparableConv(_Convolution):
  """``keras/src/layers/convolutional/base_separable_conv.py``: a depthwise convolution, then a
  1x1 ``conv`` (valid, stride 1, the layer's dilation), as Keras JAX ``nn.separable_conv``."""

  kernel_names = ("depthwise_kernel", "pointwise_kernel")

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.depth_multiplier = positive_int(config, "depth_multiplier", 1)
    self.filters = positive_int(config, "filters")
    depthwise = self.depthwise_kernel[...]
    check_shape("depthwise_kernel", depthwise, self.kernel_size + (None, self.depth_multiplier))
    check_shape(
      "pointwise_kernel",
      self.pointwise_kernel[...],
      (1,) * self.rank + (depthwise.shape[-2] * self.depth_multiplier, self.filters),
    )
    if self.use_bias:
      check_shape("bias", self.bias[...], (self.filters,))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    depthwise = self.cast(self.depthwise_kernel[...])
    pointwise = self.cast(self.pointwise_kernel[...])
    outputs = depthwise_conv(
      inputs, depthwise, self.strides, self.padding, self.data_format, self.dilation_rate
    )
    outputs = conv(
      outputs, pointwise, (1,) * self.rank, "valid", self.data_format, self.dilation_rate
    )
    return self.add_bias_and_activate(outputs)


@register("SeparableConv1D")
class SeparableConv1D(_SeparableConv):
  """``keras/src/layers/convolutional/separable_conv1d.py``."""

  rank = 1


@register("SeparableConv2D")
class SeparableConv2D(_SeparableConv):
  """``keras/src/layers/convolutional/separable_conv2d.py``."""

  rank = 2
