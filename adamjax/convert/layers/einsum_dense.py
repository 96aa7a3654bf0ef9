"""Keras's EinsumDense (``keras/src/layers/core/einsum_dense.py``), and its equation checks.

The equation comes from a possibly hostile file and is handed to ``jnp.einsum``, so it is checked
strictly before anything is built: at most :data:`MAX_EQUATION_CHARS` characters, exactly one of
the three forms Keras's ``_analyze_einsum_string`` accepts (``ab,bc->ac``, ``...ab,bc->...ac``,
``ab...,bc->ac...``; letters only, each letter at most once per operand), every output letter
found in the input or the kernel, every kernel letter in the input or the output.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, register
from adamjax.convert.layers.activations import get_activation

MAX_EQUATION_CHARS = 64

# Keras's three forms (it matches only a prefix; a whole match is required here).
_FORMS = (
  re.compile(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)"),
  re.compile(r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)"),
  re.compile(r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\."),
)


def parse_equation(equation: Any) -> tuple[str, str, str]:
  """``(input, kernel, output)`` letters of an EinsumDense equation, or a ConversionError."""
  if not isinstance(equation, str) or len(equation) > MAX_EQUATION_CHARS:
    raise ConversionError(
      f"config equation {str(equation)[:MAX_EQUATION_CHARS]!r} is not a string of at most "
      f"{MAX_EQUATION_CHARS} characters"
    )
  for form in _FORMS:
    match = form.fullmatch(equation)
    if match:
      break
  else:
    raise ConversionError(
      f"config equation {equation!r} is not of the form ab,bc->ac, ...ab,bc->...ac or "
      "ab...,bc->ac..."
    )
  spec_in, spec_kernel, spec_out = match.groups()
  for spec in (spec_in, spec_kernel, spec_out):
    if len(set(spec)) != len(spec):
      raise ConversionError(f"config equation {equation!r} repeats a letter in {spec!r}")
  if not set(spec_out) <= set(spec_in) | set(spec_kernel):
    raise ConversionError(f"config equation {equation!r}: an output letter is in no operand")
  if not set(spec_kernel) <= set(spec_in) | set(spec_out):
    raise ConversionError(f"config equation {equation!r}: a kernel letter is in no other term")
  return spec_in, spec_kernel, spec_out


def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """``x + bias`` with the bias's leading axes made explicit (Keras broadcasts by rank)."""
  if bias.ndim > x.ndim:
    raise ValueError(f"a bias of shape {bias.shape} does not broadcast to {x.shape}")
  return jnp.add(x, jnp.reshape(bias, (1,) * (x.ndim - bias.ndim) + bias.shape))


@register("EinsumDense")
class EinsumDense(Layer):
  """``keras/src/layers/core/einsum_dense.py``: ``activation(einsum(equation, x, kernel) + bias)``.

  The bias exists when ``bias_axes`` is set; its shape (Keras's, from the file) covers the output
  axes from the first bias axis on, with ones elsewhere.
  """

  @classmethod
  def variables(cls, config):
    return ("kernel", "bias") if config.get("bias_axes") is not None else ("kernel",)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.equation = config.get("equation")
    _, spec_kernel, spec_out = parse_equation(self.equation)
    bias_axes = config.get("bias_axes")
    if bias_axes is not None and (
      not isinstance(bias_axes, str) or not bias_axes or not set(bias_axes) <= set(spec_out)
    ):
      raise ConversionError(
        f"config bias_axes = {str(bias_axes)[:MAX_EQUATION_CHARS]!r} is not letters of the "
        f"output {spec_out!r}"
      )
    if self.kernel[...].ndim != len(spec_kernel):
      raise ConversionError(
        f"kernel of shape {self.kernel[...].shape} does not fit equation {self.equation!r}"
      )
    # A LoRA layer trains two factors over a frozen kernel and a quantized one stores integer
    # kernels: neither is the plain einsum over a trainable kernel built here.
    for key in ("lora_rank", "quantization_config"):
      if config.get(key):
        raise ConversionError(f"config {key} (EinsumDense LoRA/quantization) is not supported")
    self.use_bias = bias_axes is not None
    self.activation = get_activation(config.get("activation"))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    x = jnp.einsum(self.equation, inputs, self.cast(self.kernel[...]), preferred_element_type=None)
    if self.use_bias:
      x = add_bias(x, self.cast(self.bias[...]))
    return self.activation(x)
