"""The run's settings in one place: the Keras tutorial's hyperparameters, and flags made from them.

Each field of :class:`Config` is also a command-line flag (``--batch-size`` for ``batch_size``),
with its default, type, choices and help taken from the field (:func:`add_flags`), so nothing is
written twice. A choice outside a field's ``choices`` is refused when the ``Config`` is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import optax

import adamjax

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "keras_adam": lambda lr: adamjax.keras_adam(lr),
  "adam": lambda lr: adamjax.adam(lr),
  "tf1_adam": lambda lr: adamjax.tf1_adam(lr),
  "torch_adam": lambda lr: adamjax.torch_adam(lr),
  "optax.adam": lambda lr: optax.adam(lr),
}
DATA_SOURCES = ("auto", "tfds", "idx", "pypi", "synthetic")
PROGRESS = ("auto", "bar", "epoch", "none")


def option(default: Any, help: str | None = None, **flag: Any) -> Any:
  """A dataclass field that is also a flag: ``help``, and any other ``add_argument`` option."""
  return dataclasses.field(default=default, metadata=dict(flag, help=help))


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters and run options; the defaults are the Keras tutorial's."""

  seed: int = option(0, "initial weights, data order and dropout")
  epochs: int = option(3)
  batch_size: int = option(32)
  learning_rate: float = option(1e-3)
  optimizer: str = option(
    "keras_adam", "an adamjax preset, or optax.adam for comparison", choices=tuple(OPTIMIZERS)
  )
  dropout_rate: float = option(0.2)
  hidden: int = option(128, "units of the hidden layer")
  data_source: str = option(
    "auto",
    "where MNIST comes from (train/mnist_data.py); 'synthetic' is random data for tests",
    choices=DATA_SOURCES,
  )
  data_dir: str | None = option(None, "folder with the four MNIST IDX files (raw or .gz)")
  cache_dir: str | None = option(None, "MNIST cache (default: ~/.cache/adamjax/mnist)")
  limit_train_examples: int | None = option(None, "train on the first N examples only", metavar="N")
  limit_test_examples: int | None = option(None, "evaluate on the first N only", metavar="N")
  max_steps: int | None = option(None, "stop after this many steps in all (may end mid-epoch)")
  checkpoint_every: int = option(
    0, "also checkpoint every STEPS steps (0: only at the end of each epoch)", metavar="STEPS"
  )
  keep_checkpoints: int = option(3, "more than one, so a damaged newest one has a predecessor")
  resume: bool = option(False, "continue from the newest good checkpoint in --workdir")
  init_from: str | None = option(
    None,
    "start from converted weights and Adam state: any checkpoint adamjax.convert reads "
    "(.keras, .weights.h5, a TF checkpoint, ...) or a `python -m adamjax.convert to-jax` "
    "output; training continues at its step count",
    metavar="PATH",
  )
  shard_optimizer_state: bool = option(
    False,
    "split the Adam moments over the devices (ZeRO-1: adamjax.state_sharding on the mesh's data "
    "axis), 1/devices of them on each, same results",
  )
  overwrite: bool = option(False, "delete the checkpoints and metrics of an earlier run")
  progress: str = option(
    "auto",
    "'bar' (live), 'epoch' (a line per epoch) or 'none'; auto: bar on a terminal",
    choices=PROGRESS,
  )
  progress_chunks: int = option(20, "progress bar updates per epoch (each one is a host sync)")
  plot: bool = option(True, "write metrics.png")

  def __post_init__(self):
    check_choices(self)


def check_choices(config: Any) -> None:
  """Raises ValueError naming the field if a value is not one of the field's ``choices``."""
  for field in dataclasses.fields(config):
    allowed, value = field.metadata.get("choices"), getattr(config, field.name)
    if allowed is not None and value not in allowed:
      raise ValueError(f"{field.name} must be one of {allowed}, got {value!r}")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
  """Adds a ``--kebab-case`` flag for each field of the dataclass ``cls``.

  A bool field that defaults to False is a switch (``--resume``); one that defaults to True is
  turned off by ``--no-<name>``. Other fields take one value of the field's type.
  """
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    meta, flag = dict(field.metadata), "--" + field.name.replace("_", "-")
    if hints[field.name] is bool:
      if field.default:
        meta["help"] = f"do not {meta['help']}"
        parser.add_argument(f"--no-{flag[2:]}", dest=field.name, action="store_false", **meta)
      else:
        parser.add_argument(flag, action="store_true", **meta)
      continue
    kind = hints[field.name]
    if isinstance(kind, types.UnionType):  # `int | None`: the flag takes an int.
      kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if field.default is not None:
      meta["help"] = " ".join(filter(None, (meta["help"], "(default: %(default)s)")))
    parser.add_argument(flag, **{"type": kind, "default": field.default, **meta})


def from_args(cls: type, args: argparse.Namespace) -> Any:
  """The dataclass ``cls`` built from the parsed flags that :func:`add_flags` made."""
  return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
