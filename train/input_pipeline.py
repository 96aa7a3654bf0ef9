"""MNIST for training: loaded once, scaled as Keras scales it, placed on the devices, batched.

One array type throughout, :class:`~train.mnist_data.MnistArrays`: uint8 images and int32
labels as loaded (real and verified, or synthetic for tests), then the same fields on the
devices with the images as float32 pixels (:func:`to_devices`). An epoch's batches are index
arrays into the device-resident set (:func:`epoch_batches`), a function of (seed, epoch) only.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import Config
from train.mnist_data import MnistArrays, load_mnist
from train.runtime import put

# The tutorial's `x / 255.0`: divided in float64 by numpy, then float32 as Keras casts it. A
# float32 division under jit differs: XLA multiplies by the reciprocal of 255 instead, which is one
# ulp off for 126 of the 256 pixel values. So pixels are looked up in this table.
_PIXEL_VALUES = (np.arange(256) / 255.0).astype(np.float32)


def scale_pixels(images: Any) -> Any:
  """uint8 pixels as the float32 values Keras trains on (``x / 255.0``), bit for bit.

  A NumPy array gives a NumPy array (the training data is scaled once, on the host, before it
  goes to the devices: a per-step lookup cost about 4% of a step); anything else, a jax.Array.
  """
  if isinstance(images, np.ndarray):
    return _PIXEL_VALUES[images]
  return jnp.asarray(_PIXEL_VALUES)[images]


def synthetic_mnist(num_train: int = 60000, num_test: int = 10000, seed: int = 0) -> MnistArrays:
  """MNIST-shaped learnable data (noisy copies of 10 random class templates), for tests only."""
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)

  def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    keep = rng.random((n, 28, 28)) < 0.3  # 30% of the pixels show the class template.
    return np.where(keep, templates[labels], noise), labels

  return MnistArrays(*split(num_train), *split(num_test), source="synthetic")


def load_data(config: Config, *, verbose: bool = True) -> MnistArrays:
  """Loads MNIST (real and verified, or synthetic) and applies the example limits."""
  if config.data_source == "synthetic":
    n_train = config.limit_train_examples or 60000
    n_test = config.limit_test_examples or 10000
    data = synthetic_mnist(n_train, n_test, seed=1234)
  else:
    data = load_mnist(config.data_source, config.data_dir, config.cache_dir, verbose=verbose)
  n_train = config.limit_train_examples or len(data.train_labels)
  n_test = config.limit_test_examples or len(data.test_labels)
  return MnistArrays(
    data.train_images[:n_train],
    data.train_labels[:n_train].astype(np.int32),
    data.test_images[:n_test],
    data.test_labels[:n_test].astype(np.int32),
    data.source,
  )


def epoch_batches(
  num_examples: int, batch_size: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
  """The shuffled batches of one epoch: example indices and a mask, both [steps, batch_size].

  The order is a function of (seed, epoch) only, so a run resumed mid-epoch sees the same
  batches. The last batch is padded (index 0, mask False) when ``batch_size`` does not divide
  ``num_examples``; the step then averages over its real examples, as Keras's ``fit`` does.
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = math.ceil(num_examples / batch_size)
  index = np.zeros(steps * batch_size, np.int32)
  index[:num_examples] = order
  mask = np.arange(steps * batch_size) < num_examples
  return index.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def to_devices(data: MnistArrays, mesh: Mesh) -> MnistArrays:
  """The data on the mesh, images as float32 pixels: the training set replicated (every device
  gathers its batches from it), the test set split over the devices.

  The test set is padded with its own first examples to a multiple of the devices; the
  evaluation counts only the first ``len(data.test_labels)`` (see ``train.train.make_evaluate``).
  """
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  pad = -len(data.test_labels) % mesh.size
  return MnistArrays(
    put(scale_pixels(data.train_images), replicated),
    put(data.train_labels, replicated),
    put(scale_pixels(np.concatenate([data.test_images, data.test_images[:pad]])), split),
    put(np.concatenate([data.test_labels, data.test_labels[:pad]]), split),
    data.source,
  )
