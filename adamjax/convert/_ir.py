"""The converter's intermediate representation: a Keras model's variables and Adam state as data.

Every reader (``.keras``, ``.weights.h5``, TensorBundle, tf-keras ``.h5``, Orbax callback,
SavedModel variables) produces a :class:`KerasCheckpoint`, and every writer consumes one. All of a
format's quirks (positional optimizer slots, class-named h5 groups, object-graph paths, ``_kernel``
vs ``kernel``) stay inside its reader; the mapping onto a Flax model (``_flax.py``) sees only this.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Keras's variable names for each layer class, in Keras's own order (the order of
# ``layer.weights``, which is the order of the h5 ``vars/0..n`` datasets).
LAYER_VARIABLES: dict[str, tuple[str, ...]] = {
  "Dense": ("kernel", "bias"),
  "Conv1D": ("kernel", "bias"),
  "Conv2D": ("kernel", "bias"),
  "Conv3D": ("kernel", "bias"),
  "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
  "LayerNormalization": ("gamma", "beta"),
  "Embedding": ("embeddings",),
}

# Keras layers that hold no variables and are safe to skip.
STATELESS_LAYERS = frozenset(
  {
    "InputLayer",
    "Flatten",
    "Dropout",
    "Activation",
    "ReLU",
    "Softmax",
    "Reshape",
    "MaxPooling1D",
    "MaxPooling2D",
    "AveragePooling1D",
    "AveragePooling2D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "Rescaling",
    "ZeroPadding2D",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "Identity",
  }
)


# Longest message a ConversionError carries; longer ones keep their head and tail. Readers quote
# file data through ``_safe_io.clip`` (about 100 characters); this bounds the rest.
MAX_MESSAGE_CHARS = 1500


class ConversionError(ValueError):
  """A checkpoint cannot be converted: malformed, unsafe, unsupported, or not matching the target.

  The message names the file, the entry and the reason. It is at most
  :data:`MAX_MESSAGE_CHARS` long and always printable as UTF-8 (a lone surrogate or other
  undecodable text from a file is escaped), so a hostile file cannot flood a terminal or a log.
  """

  def __init__(self, message: object = "", *args: object):
    text = str(message)
    if len(text) > MAX_MESSAGE_CHARS:
      tail = 300
      cut = len(text) - MAX_MESSAGE_CHARS + 40
      text = f"{text[: MAX_MESSAGE_CHARS - tail - 40]} [...{cut} characters cut...] {text[-tail:]}"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    super().__init__(text, *args)


@dataclasses.dataclass
class KerasLayer:
  """One Keras layer that owns variables.

  Attributes:
    name: Keras's layer name as the weights file spells it: the class-based name of the h5
      group (``dense``, ``dense_1``, ``batch_normalization``); for layers of nested models the
      '/'-joined path (``sequential/dense``). This is also the Flax module name it maps to.
    class_name: The Keras class (``Dense``, ``Conv2D``, ``BatchNormalization``, ...).
    weights: Variable name (Keras's, e.g. ``kernel``, ``gamma``) to array, in Keras's order.
    trainable: The names in ``weights`` that are trainable (that the optimizer updates and keeps
      slots for). BatchNorm moving statistics and every variable of a frozen layer are not.
    config: The layer's Keras config (as JSON data) when the source has one, else None.
  """

  name: str
  class_name: str
  weights: dict[str, np.ndarray]
  trainable: tuple[str, ...]
  config: dict[str, Any] | None = None


@dataclasses.dataclass
class KerasAdamState:
  """Keras's Adam (or AdamW) optimizer variables, tied to the variables they belong to.

  Attributes:
    class_name: ``Adam`` or ``AdamW`` (other optimizers are refused by the readers).
    config: The optimizer's Keras config (``beta_1``, ``beta_2``, ``epsilon``, ``amsgrad``,
      ``weight_decay``, ``clipnorm``, ...) as JSON data; ``{}`` when the source has none.
    iterations: Keras's ``iterations`` counter (steps applied so far).
    learning_rate: The ``learning_rate`` variable's float32 value, or None when the learning
      rate is a schedule (Keras then stores no variable) or the format does not store it.
    momentums, velocities: ``(layer name, variable name)`` to Keras's ``m`` and ``v`` slot.
    velocity_hats: Same for AMSGrad's ``v_hat`` (empty unless ``amsgrad``).
  """

  class_name: str
  config: dict[str, Any]
  iterations: int
  learning_rate: np.float32 | None
  momentums: dict[tuple[str, str], np.ndarray]
  velocities: dict[tuple[str, str], np.ndarray]
  velocity_hats: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KerasCheckpoint:
  """A Keras model's variables (and Adam state, if any) read from one checkpoint.

  Attributes:
    format: What was read, e.g. ``"keras"``, ``"weights.h5"``, ``"weights.json"``,
      ``"tf-checkpoint"``, ``"tf-keras-h5"``, ``"orbax-callback"``, ``"savedmodel"``.
    layers: The layers that own variables, in the model's layer order (nested models
      depth-first), which is also the order of ``model.trainable_variables``.
    optimizer: The Adam state, or None when the checkpoint holds none (e.g. a SavedModel from
      ``model.export()``, or weights saved without the optimizer).
    model_config: The model's Keras config (``config.json``), already checked against the
      allow-list, when the source has one; writers reuse it for ``.keras`` output.
    notes: Things the user should know that are not errors (e.g. "weights only: a SavedModel
      holds no optimizer state").
    source: The path it was read from (set by :func:`adamjax.convert.read`; errors name it).
    dropped_optimizer: The class of the model's compiled optimizer when it is not Adam/AdamW
      (``"SGD"``, ``"RMSprop"``...): the weights are read, its state is not carried over.
  """

  format: str
  layers: list[KerasLayer]
  optimizer: KerasAdamState | None = None
  model_config: dict[str, Any] | None = None
  notes: tuple[str, ...] = ()
  source: str = ""
  dropped_optimizer: str | None = None

  def layer(self, name: str) -> KerasLayer:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(name)

  def trainable_keys(self) -> list[tuple[str, str]]:
    """``(layer, variable)`` of every trainable variable, in ``model.trainable_variables`` order."""
    return [
      (layer.name, var) for layer in self.layers for var in layer.weights if var in layer.trainable
    ]


def infer_layer_class(weights: dict[str, np.ndarray]) -> str:
  """Guesses a layer's Keras class from its variable names and ranks (sources without a config).

  Raises:
    ConversionError: if the variables match no supported layer.
  """
  names = tuple(weights)
  if set(names) in ({"kernel", "bias"}, {"kernel"}):
    rank = weights["kernel"].ndim
    return {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(rank, "Dense")
  for class_name, variables in LAYER_VARIABLES.items():
    if set(names) == set(variables):
      return class_name
  raise ConversionError(
    f"variables {list(names)} match no supported Keras layer (supported: {sorted(LAYER_VARIABLES)})"
  )


def class_layer_names(class_names: list[str]) -> list[str]:
  """Keras's class-based names for a model's layers: ``dense``, ``dense_1``, ``conv2d``, ...

  This is how Keras 3 names the h5 groups of a model's layers (``keras/src/saving``), and the
  name the converter uses for a layer in any format.
  """
  counts: dict[str, int] = {}
  names = []
  for class_name in class_names:
    base = snake_case(class_name)
    n = counts.get(base, 0)
    counts[base] = n + 1
    names.append(base if n == 0 else f"{base}_{n}")
  return names


def snake_case(class_name: str) -> str:
  """Keras's ``naming.to_snake_case``: ``BatchNormalization`` -> ``batch_normalization``."""
  import re

  name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
  return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
