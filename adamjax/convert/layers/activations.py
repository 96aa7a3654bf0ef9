"""Keras's built-in activations by name, and the activation layers (``keras/src/activations``,
``keras/src/layers/activations``), computed as the Keras JAX backend computes them."""

from __future__ import annotations

from collections.abc import Callable

import jax

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, register

# TODO(core helper): every name in _keras_config.ACTIVATIONS, exactly as keras/src/backend/jax/nn.py.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "linear": lambda x: x,
  "relu": jax.nn.relu,
}


def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
  if name is None:
    return ACTIVATIONS["linear"]
  if name not in ACTIVATIONS:
    raise ConversionError(f"activation {name!r} is not a built-in Keras activation")
  return ACTIVATIONS[name]


@register("Activation")
class Activation(Layer):
  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.activation = get_activation(config.get("activation"))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return self.activation(inputs)
