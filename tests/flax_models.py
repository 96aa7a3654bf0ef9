"""Flax NNX twins of tests/keras_models.py, named as Keras names the layers.

Built with Keras's numeric defaults where Flax's differ: Conv padding "VALID" (Flax: "SAME"),
BatchNorm epsilon 1e-3 (Flax: 1e-5) and momentum 0.99 (the same in both).
"""

import flax.linen
import jax
from flax import nnx


class SmallCNN(nnx.Module):
  """keras_models.small_cnn: Conv2D(8, 3, relu) -> BatchNorm -> MaxPool -> Dense(32) -> Dense(10)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv2d = nnx.Conv(1, 8, kernel_size=(3, 3), padding="VALID", rngs=rngs)
    self.batch_normalization = nnx.BatchNorm(8, epsilon=1e-3, momentum=0.99, rngs=rngs)
    self.dense = nnx.Linear(13 * 13 * 8, 32, rngs=rngs)  # Frozen in Keras.
    self.dense_1 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nnx.relu(self.conv2d(x))
    x = self.batch_normalization(x, use_running_average=not train)
    x = flax.linen.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dense(x))
    return self.dense_1(x)
