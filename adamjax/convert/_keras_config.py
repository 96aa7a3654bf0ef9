"""Keras model configs read as plain JSON data: an allow-list check, the layers, the optimizer.

A ``.keras`` archive's ``config.json`` and a tf-keras ``.h5``'s ``model_config`` and
``training_config`` attributes are what ``keras.saving.load_model`` turns back into objects,
and that step is where Keras's loading exploits live: Lambda bytecode, ``module`` imports of
arbitrary code, ``TFSMLayer`` SavedModels, lookup layers reading vocabulary files (see the
advisories listed in ``keras/src/saving/serialization_lib.py``'s history). Here a config is
never deserialized. :func:`check_config` walks every nested object that has a ``class_name``
against an allow-list of ``(module, class_name)`` pairs and refuses anything else, naming its
place in the config; :func:`parse_model_config` then reads the layer list and the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from adamjax.convert._ir import (
  LAYER_VARIABLES,
  ConversionError,
  class_layer_names,
)
from adamjax.convert._safe_io import clip
from adamjax.convert.layers import LAYERS, OPS
from adamjax.convert.layers._regularizers import CONSTRAINTS, REGULARIZERS

# Layer classes a config may name: those the registry builds (and InputLayer). The classes the
# weights-only readers know by their variables are among them.
_LAYERS = frozenset(LAYERS) | {"InputLayer"}
_MODELS = frozenset({"Sequential", "Functional"})
_INITIALIZERS = frozenset(
  {
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Identity",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "Orthogonal",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
  }
)
_SCHEDULES = frozenset(
  {
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
  }
)
# Loss and metric classes whose configs are numbers and names only. Wrappers that take a
# function (LossFunctionWrapper) are left out: their ``fn`` would be a serialized function.
_LOSSES = frozenset(
  {
    "BinaryCrossentropy",
    "BinaryFocalCrossentropy",
    "CategoricalCrossentropy",
    "CategoricalFocalCrossentropy",
    "CategoricalHinge",
    "CosineSimilarity",
    "Hinge",
    "Huber",
    "KLDivergence",
    "LogCosh",
    "MeanAbsoluteError",
    "MeanAbsolutePercentageError",
    "MeanSquaredError",
    "MeanSquaredLogarithmicError",
    "Poisson",
    "SparseCategoricalCrossentropy",
    "SquaredHinge",
  }
)
_METRICS = (
  frozenset(
    {
      "Accuracy",
      "BinaryAccuracy",
      "CategoricalAccuracy",
      "SparseCategoricalAccuracy",
      "TopKCategoricalAccuracy",
      "SparseTopKCategoricalAccuracy",
      "Mean",
      "Sum",
      "AUC",
      "Precision",
      "Recall",
      "RootMeanSquaredError",
      "MeanMetricWrapper",
    }
  )
  | _LOSSES
)
_OPTIMIZERS = frozenset({"Adam", "AdamW"})
# Keras's other built-in optimizers: a model compiled with one converts its weights, with a note
# that its optimizer state is not carried over (only Adam/AdamW state maps to adamjax).
OTHER_OPTIMIZERS = frozenset(
  {"SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Nadam", "Ftrl", "Lion", "Lamb", "Adafactor"}
)

# (module, class_name) pairs Keras 3 writes for the objects the converter accepts.
ALLOWED: dict[str, frozenset[str]] = {
  "keras": frozenset({"Sequential", "DTypePolicy", "FloatDTypePolicy"}),
  "keras.src.models.functional": frozenset({"Functional"}),
  "keras.layers": _LAYERS,
  "keras.initializers": _INITIALIZERS,
  "keras.optimizers": _OPTIMIZERS | OTHER_OPTIMIZERS,
  "keras.optimizers.schedules": _SCHEDULES,
  "keras.losses": _LOSSES,
  "keras.metrics": _METRICS,
  "keras.regularizers": REGULARIZERS,
  "keras.constraints": CONSTRAINTS,
  **{module: frozenset(name for m, name in OPS if m == module) for module in {m for m, _ in OPS}},
}
# Objects without a ``module``: tf-keras (Keras 2) configs name only the class, which Keras
# resolves among its built-ins; Keras 3 writes the symbolic inputs of a Functional model's
# nodes as ``__keras_tensor__`` (shape and dtype only) and constant arrays in a layer's config
# (``Rescaling(np.array(...))``) as ``__numpy__``/``__tensor__`` (a list of numbers and a dtype). tf-keras registers its own optimizers
# as ``Custom>Adam`` (observed in tf-keras 2.21 ``training_config``).
_ALLOWED_WITHOUT_MODULE = (
  _LAYERS
  | _MODELS
  | _INITIALIZERS
  | _SCHEDULES
  | _METRICS
  | _OPTIMIZERS
  | OTHER_OPTIMIZERS
  | REGULARIZERS
  | CONSTRAINTS
  | {"Custom>Adam", "Custom>AdamW", "__keras_tensor__", "__numpy__", "__tensor__"}
)
# Keras writes a non-null ``registered_name`` for these built-ins (the class's own name).
# Keras's own operations (``keras.ops`` nodes of a Functional graph) are registered too.
_REGISTERED_BUILTINS = frozenset({("keras.src.models.functional", "Functional")}) | frozenset(OPS)

ACTIVATIONS = frozenset(
  {
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "sigmoid",
    "hard_sigmoid",
    "softmax",
    "log_softmax",
    "softplus",
    "softsign",
    "tanh",
    "swish",
    "silu",
    "hard_silu",
    "hard_swish",
    "mish",
    "exponential",
  }
)

# Why the usual suspects are refused, for an error message a user can act on.
_REASONS = {
  "Lambda": "a Lambda layer carries Python bytecode that Keras would execute",
  "__lambda__": "a serialized Python lambda (bytecode that Keras would execute)",
  "function": "a serialized Python function (a custom object Keras would import)",
  "TFSMLayer": "TFSMLayer loads and runs an external TensorFlow SavedModel",
  "StringLookup": "lookup layers read vocabulary files when loaded (CVE-2025-12058)",
  "IntegerLookup": "lookup layers read vocabulary files when loaded (CVE-2025-12058)",
  "IndexLookup": "lookup layers read vocabulary files when loaded (CVE-2025-12058)",
  "TextVectorization": "lookup layers read vocabulary files when loaded (CVE-2025-12058)",
  "TorchModuleWrapper": "TorchModuleWrapper holds a pickled PyTorch module",
  "LossScaleOptimizer": "a loss-scale optimizer (mixed precision) has a different state layout",
}

# The optimizer config keys Keras 3 Adam/AdamW write (``keras/src/optimizers/base_optimizer.py``
# ``get_config`` plus ``adam.py``); anything else is refused.
OPTIMIZER_KEYS = frozenset(
  {
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
  }
)
_MAX_DEPTH = 64


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a model config.

  Attributes:
    path: The converter's name for the layer: Keras's class-based name (``dense_1``),
      '/'-joined below nested models (``sequential/conv2d``); also its h5 group path.
    name: The user's layer name (``config["name"]``).
    class_name: The Keras class.
    config: The layer's own config (``get_config()``), as JSON data.
    trainable: Whether the optimizer updates it: its own flag and every enclosing model's.
  """

  path: str
  name: str
  class_name: str
  config: dict[str, Any]
  trainable: bool


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The compiled optimizer: ``Adam`` or ``AdamW`` and its config as JSON data."""

  class_name: str
  config: dict[str, Any]

  @property
  def has_learning_rate_variable(self) -> bool:
    """False under a schedule: Keras then keeps no ``learning_rate`` variable."""
    return not isinstance(self.config.get("learning_rate"), dict)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A checked model config.

  Attributes:
    name, class_name: The model's own name and class (``Sequential`` or ``Functional``).
    layers: Every layer that is not a model, in ``model.layers`` order with nested models
      expanded depth-first (the order of ``model.weights``).
    submodels: The nested models themselves (they own an h5 ``vars`` group but no variables).
    saved: Layers and nested models together, each model before its layers: the order in
      which Keras writes their h5 groups.
    optimizer: The compiled optimizer, or None if the config has none.
    other_optimizer: The class of a compiled optimizer other than Adam/AdamW (``SGD``,
      ``RMSprop``...): the weights convert, its state is not carried (``optimizer`` is None).
  """

  name: str
  class_name: str
  layers: tuple[LayerSpec, ...]
  submodels: tuple[LayerSpec, ...]
  saved: tuple[LayerSpec, ...]
  optimizer: OptimizerSpec | None
  other_optimizer: str | None = None


def load_json(data: bytes | str, source: str) -> Any:
  """Parses JSON text, turning every failure into a :class:`ConversionError` naming ``source``."""
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:
    raise ConversionError(f"{source}: not valid JSON ({e})") from None


def _refuse(source: str, where: str, what: str, reason: str) -> ConversionError:
  return ConversionError(f"{source}: refusing {what} at {where}: {reason}")


def check_config(config: Any, source: str, where: str = "$") -> None:
  """Walks a config and refuses every object that is not known to be plain data.

  Every dict with a ``class_name`` must be an allowed ``(module, class_name)`` pair with a
  null ``registered_name``; ``module`` must be ``keras`` or ``keras.*``; activations must be
  built-in names; quantized and LoRA layers are refused.

  Args:
    config: Parsed JSON (``config.json``, tf-keras ``model_config`` / ``training_config``).
    source: The file (and member) it came from, for messages.
    where: The JSON path of ``config`` inside the file (``$`` for the root).

  Raises:
    ConversionError: naming the JSON path, the object and why it is refused; every refused
      object of the config is listed in the one message.
  """
  refused: list[str] = []
  _check(config, source, where, 0, refused)
  if len(refused) == 1:
    raise ConversionError(f"{source}: refusing {refused[0]}")
  if refused:
    raise ConversionError(
      f"{source}: refusing {len(refused)} objects of the config:\n  " + "\n  ".join(refused)
    )


def _check(node: Any, source: str, where: str, depth: int, refused: list[str]) -> None:
  if depth > _MAX_DEPTH:
    raise _refuse(source, where, "the config", f"nested deeper than {_MAX_DEPTH} levels")
  if isinstance(node, list):
    for i, item in enumerate(node):
      _check(item, source, f"{where}[{i}]", depth + 1, refused)
    return
  if not isinstance(node, dict):
    return
  if "class_name" in node:
    problem = _check_object(node, source, where)
    if problem is not None:
      refused.append(problem)
      return
  for key, value in node.items():
    path = f"{where}.{key}"
    if key in ("activation", "recurrent_activation") and not isinstance(value, dict):
      if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
        raise _refuse(
          source,
          path,
          f"activation {clip(value)}",
          f"not a built-in Keras activation ({sorted(ACTIVATIONS)})",
        )
    elif key == "quantization_config" and value is not None:
      raise _refuse(
        source,
        path,
        "a quantized layer",
        "quantized weights are not plain float variables the converter can map",
      )
    elif key == "lora_rank" and value:
      raise _refuse(source, path, "a LoRA layer", "LoRA adapters are not supported")
    _check(value, source, path, depth + 1, refused)


def _check_object(node: dict[str, Any], source: str, where: str) -> str | None:
  """None if the object is allowed, else "<what> at <where>: <why>" (an unsafe structure
  raises at once)."""
  class_name, module = node["class_name"], node.get("module")
  if not isinstance(class_name, str) or not isinstance(module, (str, type(None))):
    raise _refuse(source, where, "an object", "class_name/module are not strings")
  label = f"{module}.{class_name}" if module else class_name
  if class_name in _REASONS:
    return f"{label} at {where}: {_REASONS[class_name]}"
  if module is not None and module != "keras" and not module.startswith("keras."):
    return f"{label} at {where}: module {clip(module)} is outside Keras; Keras would import it (custom code)"
  registered = node.get("registered_name")
  if registered is not None and not (
    registered == class_name and (module, class_name) in _REGISTERED_BUILTINS
  ):
    return (
      f"{label} at {where}: registered_name {clip(registered)} marks a custom "
      "(user-registered) object, whose code is not in Keras"
    )
  allowed = ALLOWED.get(module, frozenset()) if module else _ALLOWED_WITHOUT_MODULE
  if class_name not in allowed:
    return (
      f"{label} at {where}: not on the converter's allow-list of built-in "
      "Keras layers, initializers, optimizers, losses and metrics"
    )
  if class_name.endswith("DTypePolicy"):
    inner = node.get("config")
    policy = inner.get("name") if isinstance(inner, dict) else None
    if not isinstance(policy, str) or policy not in (
      "float32",
      "float16",
      "bfloat16",
      "float64",
      "mixed_float16",
      "mixed_bfloat16",
    ):
      raise _refuse(
        source,
        where,
        f"dtype policy {clip(policy)}",
        "only float policies are supported (not quantized ones)",
      )
  return None


def owner_path(layer: str) -> str:
  """A layer's h5 group in Keras 3 weights: ``sequential/conv2d`` ->
  ``layers/sequential/layers/conv2d`` (``saving_lib._save_state`` nests by attribute)."""
  return "layers/" + layer.replace("/", "/layers/")


def variable_names(class_name: str, config: dict[str, Any] | None) -> tuple[str, ...]:
  """The variables a layer owns, in Keras's order (``vars/0..n``), given its config.

  The layer registry says (``use_bias=False`` drops ``bias``, an LSTM's are ``cell/kernel``,
  ...); without a config, Keras's defaults.

  Raises:
    ConversionError: if the config is malformed for its class.
  """
  cls = LAYERS.get(class_name)
  if cls is None:
    return LAYER_VARIABLES.get(class_name, ())
  try:
    return tuple(cls.variables(config or {}))
  except ConversionError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConversionError(f"a {class_name} config: {type(e).__name__}: {clip(e)}") from None


def trainable_names(
  class_name: str,
  names: tuple[str, ...],
  trainable: bool,
  config: dict[str, Any] | None = None,
) -> tuple[str, ...]:
  """The variables among ``names`` that get optimizer slots.

  None of a frozen layer's; never those Keras creates with ``trainable=False`` (BatchNorm's
  moving statistics, Normalization's mean and variance: the registry's ``non_trainable``).
  """
  if not trainable:
    return ()
  cls = LAYERS.get(class_name)
  frozen = cls.non_trainable(config or {}) if cls is not None else frozenset()
  return tuple(n for n in names if n not in frozen)


def parse_model_config(config: Any, source: str, *, check: bool = True) -> ModelSpec:
  """Reads a Keras 3 ``config.json`` or a tf-keras ``model_config`` as a :class:`ModelSpec`.

  Args:
    config: The parsed JSON: ``{"class_name": "Sequential" | "Functional", "config": {...},
      "compile_config": {...}}`` (Keras 3) or ``{"class_name": ..., "config": ...}`` (tf-keras,
      whose optimizer lives in ``training_config``: see :func:`parse_optimizer_config`).
    source: The file it came from, for messages.
    check: Run :func:`check_config` first (callers that already did may skip it).

  Returns:
    The layers (nested models depth-first, with Keras's class-based paths), nested models,
    and the compiled Adam/AdamW, if any.

  Raises:
    ConversionError: if the config is refused by :func:`check_config`, is not a Sequential or
      Functional model, or compiles an optimizer other than Adam/AdamW.
  """
  if check:
    check_config(config, source)
  if not isinstance(config, dict) or config.get("class_name") not in _MODELS:
    got = config.get("class_name") if isinstance(config, dict) else type(config).__name__
    raise ConversionError(
      f"{source}: the model config is a {clip(got)}, not a Sequential or Functional model"
    )
  saved: list[LayerSpec] = []
  submodels: set[str] = set()
  _walk_model(config, "", True, source, "$", saved, submodels)
  optimizer, other = None, None
  compile_config = config.get("compile_config")
  if isinstance(compile_config, dict) and compile_config.get("optimizer") is not None:
    other = other_optimizer(compile_config["optimizer"])
    if other is None:
      optimizer = parse_optimizer_config(
        compile_config["optimizer"], source, where="$.compile_config.optimizer"
      )
  inner = config.get("config") or {}
  return ModelSpec(
    name=str(inner.get("name", "")),
    class_name=config["class_name"],
    layers=tuple(s for s in saved if s.path not in submodels),
    submodels=tuple(s for s in saved if s.path in submodels),
    saved=tuple(saved),
    optimizer=optimizer,
    other_optimizer=other,
  )


def _walk_model(
  model: dict[str, Any],
  prefix: str,
  trainable: bool,
  source: str,
  where: str,
  saved: list[LayerSpec],
  submodels: set[str],
) -> None:
  inner = model.get("config")
  entries = inner.get("layers") if isinstance(inner, dict) else None
  if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
    raise ConversionError(f"{source}: {where}.config.layers is not a list of layers")
  indexed = list(enumerate(entries))
  # A Sequential's ``model.layers`` leaves out its InputLayer (``keras/src/models/
  # sequential.py``), so the h5 groups are named without it; a Functional's keeps them.
  if (
    model["class_name"] == "Sequential" and entries and entries[0].get("class_name") == "InputLayer"
  ):
    indexed = indexed[1:]
  for i, entry in indexed:
    if not isinstance(entry.get("class_name"), str):
      raise ConversionError(f"{source}: {where}.config.layers[{i}] has no class_name")
  # ``keras.ops`` nodes are not layers: Keras saves nothing for them and does not count them in
  # the class-based names of the h5 groups.
  indexed = [
    (i, e)
    for i, e in indexed
    if not (isinstance(e.get("module"), str) and e["module"].startswith("keras.src.ops."))
  ]
  names = class_layer_names([e["class_name"] for _, e in indexed])
  for (i, entry), name in zip(indexed, names, strict=True):
    here = f"{where}.config.layers[{i}]"
    config = entry.get("config")
    if not isinstance(config, dict):
      raise ConversionError(f"{source}: {here}.config is not an object")
    own = config.get("trainable", True)
    if not isinstance(own, bool):
      raise ConversionError(f"{source}: {here}.config.trainable is not true/false")
    spec = LayerSpec(
      path=prefix + name,
      name=str(config.get("name", name)),
      class_name=entry["class_name"],
      config=config,
      trainable=trainable and own,
    )
    saved.append(spec)
    if spec.class_name in _MODELS:
      submodels.add(spec.path)
      _walk_model(entry, spec.path + "/", spec.trainable, source, here, saved, submodels)


def other_optimizer(optimizer: Any) -> str | None:
  """The class name if a compiled optimizer config is a Keras built-in other than Adam/AdamW."""
  if isinstance(optimizer, str):
    name = {"sgd": "SGD", "rmsprop": "RMSprop"}.get(optimizer.lower(), optimizer.capitalize())
  elif isinstance(optimizer, dict):
    name = str(optimizer.get("class_name")).removeprefix("Custom>")
  else:
    return None
  return name if name in OTHER_OPTIMIZERS else None


def parse_optimizer_config(optimizer: Any, source: str, where: str = "$") -> OptimizerSpec:
  """Reads a compiled optimizer's config: Keras 3 ``compile_config.optimizer`` or tf-keras's
  ``training_config.optimizer_config``.

  tf-keras's keys are translated to Keras 3's: ``Custom>Adam`` is Adam, ``decay`` (legacy
  time-based decay) must be 0 and is dropped, as are ``jit_compile`` and
  ``is_legacy_optimizer`` (they do not change the arithmetic).

  Raises:
    ConversionError: for optimizers other than Adam/AdamW, unknown config keys, or a legacy
      ``decay`` other than 0.
  """
  if isinstance(optimizer, str):
    # ``compile(optimizer="adam")`` that Keras did not expand: its defaults.
    optimizer = {"class_name": optimizer.capitalize(), "config": {}}
  if not isinstance(optimizer, dict) or not isinstance(optimizer.get("config"), dict):
    raise ConversionError(f"{source}: {where} is not an optimizer config")
  class_name = str(optimizer.get("class_name")).removeprefix("Custom>")
  label = {"Adamw": "AdamW"}.get(class_name, class_name)
  if label not in _OPTIMIZERS:
    raise ConversionError(
      f"{source}: the optimizer at {where} is {class_name}; only Keras Adam and AdamW are supported"
    )
  config = dict(optimizer["config"])
  decay = config.pop("decay", 0.0)
  if decay:
    raise ConversionError(
      f"{source}: the optimizer at {where} is tf-keras's legacy Adam with decay={decay}: "
      "its learning rate is lr / (1 + decay * iterations), a schedule the converter does "
      "not carry over"
    )
  for key in ("jit_compile", "is_legacy_optimizer"):
    config.pop(key, None)
  unknown = sorted(set(config) - OPTIMIZER_KEYS)
  if unknown:
    raise ConversionError(
      f"{source}: the optimizer at {where} has config keys the converter does not know: {unknown}"
    )
  return OptimizerSpec(class_name=label, config=config)


def keras3_slot_layout(
  n: int,
  *,
  learning_rate: bool = True,
  use_ema: bool = False,
  accumulation: bool = False,
  amsgrad: bool = False,
) -> dict[str, list[int]]:
  """Where each Adam variable sits in Keras 3's ``optimizer.variables`` (h5 ``vars/<i>``).

  The order is that of creation (``keras/src/optimizers/base_optimizer.py`` ``__init__`` and
  ``build``, then ``adam.py`` ``build``): ``iteration``; ``learning_rate`` unless it is a
  schedule; with ``use_ema`` one ``average`` per trainable variable; with
  ``gradient_accumulation_steps`` one ``accumulator`` per variable; then ``(momentum,
  velocity)`` pairs; with ``amsgrad`` one ``velocity_hat`` per variable after all pairs.

  Args:
    n: The number of trainable variables (``len(model.trainable_variables)``).
    learning_rate: Whether Keras keeps a ``learning_rate`` variable (not under a schedule).
    use_ema, accumulation, amsgrad: The optimizer's options that add variables.

  Returns:
    Slot kind -> positions: ``iteration``, ``learning_rate`` (empty under a schedule),
    ``average``, ``accumulator``, ``momentum``, ``velocity``, ``velocity_hat``, and ``total``
    (``[count]``).
  """
  at = 0

  def take(count: int) -> list[int]:
    nonlocal at
    at += count
    return list(range(at - count, at))

  layout = {
    "iteration": take(1),
    "learning_rate": take(1 if learning_rate else 0),
    "average": take(n if use_ema else 0),
    "accumulator": take(n if accumulation else 0),
  }
  pairs = take(2 * n)
  layout["momentum"], layout["velocity"] = pairs[0::2], pairs[1::2]
  layout["velocity_hat"] = take(n if amsgrad else 0)
  layout["total"] = [at]
  return layout


def optimizer_slot_layout(optimizer: OptimizerSpec, n: int) -> dict[str, list[int]]:
  """:func:`keras3_slot_layout` for a compiled optimizer's config."""
  config = optimizer.config
  return keras3_slot_layout(
    n,
    learning_rate=optimizer.has_learning_rate_variable,
    use_ema=bool(config.get("use_ema")),
    accumulation=bool(config.get("gradient_accumulation_steps")),
    amsgrad=bool(config.get("amsgrad")),
  )
