"""The Keras tutorial's model in Flax NNX: ``Flatten -> Dense(128, relu) -> Dropout(0.2) -> Dense(10)``."""

from __future__ import annotations

import jax
from flax import nnx


class MLP(nnx.Module):
  """The tutorial's model, with Keras's initializers (glorot-uniform kernels, zero biases).

  The layers are named as Keras names the tutorial's (``dense``, ``dropout``, ``dense_1``), so
  ``adamjax.convert`` maps a Keras checkpoint onto this model by layer and variable name.
  """

  def __init__(self, hidden: int = 128, dropout_rate: float = 0.2, *, rngs: nnx.Rngs):
    glorot, zeros = nnx.initializers.glorot_uniform(), nnx.initializers.zeros_init()
    self.dense = nnx.Linear(28 * 28, hidden, kernel_init=glorot, bias_init=zeros, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dense_1 = nnx.Linear(hidden, 10, kernel_init=glorot, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Returns logits; dropout is applied only when a ``dropout_key`` is given (training).

    ``dropout_key`` goes to the dropout layer as its ``rngs``; a layer that replaces
    ``self.dropout`` may take another kind of value there (train/parity.py's keep masks).
    """
    x = x.reshape(x.shape[0], -1)  # Flatten
    x = nnx.relu(self.dense(x))
    x = self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)
    return self.dense_1(x)
