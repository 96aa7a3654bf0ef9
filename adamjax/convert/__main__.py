"""Command line: ``python -m adamjax.convert {info,to-jax,to-keras} ...``.

Examples::

    # What is in a checkpoint (format, layers, shapes, optimizer); reads it fully and validates it.
    python -m adamjax.convert info model.keras
    # Keras/TF -> an Orbax checkpoint that `train/mnist.py --init-from` continues from.
    python -m adamjax.convert to-jax model.keras converted/
    # Back to Keras: from a converted checkpoint or a train/mnist.py workdir.
    python -m adamjax.convert to-keras converted/ continued.keras
    python -m adamjax.convert to-keras workdir/mnist/run continued.keras --template model.keras
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adamjax import convert
from adamjax.convert import _orbax
from adamjax.convert._safe_io import clip


def _describe(ckpt: convert.KerasCheckpoint) -> str:
  lines = [f"format: {ckpt.format}"]
  for layer in ckpt.layers:
    shapes = ", ".join(
      f"{var}{list(v.shape)}{'' if var in layer.trainable else ' (frozen)'}"
      for var, v in layer.weights.items()
    )
    lines.append(f"  {clip(layer.name)[1:-1]} ({clip(layer.class_name)[1:-1]}): {shapes}")
  opt = ckpt.optimizer
  if opt is None and ckpt.dropped_optimizer is not None:
    lines.append(f"optimizer: {clip(ckpt.dropped_optimizer)[1:-1]} (its state is not carried over)")
  elif opt is None:
    lines.append("optimizer: none")
  else:
    lr = "schedule or not stored" if opt.learning_rate is None else f"{opt.learning_rate:.8g}"
    lines.append(
      f"optimizer: {opt.class_name}, iterations {opt.iterations}, learning rate "
      f"{lr}, {len(opt.momentums)} moment pairs" + (", AMSGrad" if opt.velocity_hats else "")
    )
    config = opt.config if isinstance(opt.config, dict) else {}
    settings = ", ".join(f"{clip(k)[1:-1]}={clip(v, 60)}" for k, v in config.items() if k != "name")
    if settings:
      lines.append(f"  config: {clip(settings, 1000)[1:-1]}")
  lines += [f"note: {clip(note, 500)[1:-1]}" for note in ckpt.notes]
  return "\n".join(lines)


def _train_workdir_state(workdir: Path) -> dict[str, Any]:
  """The newest checkpoint of a train/mnist.py workdir, restored untyped (dicts of arrays).

  Read as training resumes it: files checked against their sha256 manifest first.
  """
  from adamjax.convert._train_workdir import read_checkpoint

  return read_checkpoint(workdir)[0]


def to_keras(source: Path, out: Path, template: Path | None) -> convert.KerasCheckpoint:
  """Writes ``out`` (.keras or .weights.h5) from a converted checkpoint or a train workdir."""
  if (source / "checkpoints").is_dir():
    if template is None:
      raise convert.ConversionError(
        f"{source} is a train/mnist.py workdir: pass --template, a Keras file of the same "
        "model (it supplies the Keras layer names, optimizer settings and config)"
      )
    like = convert.read(template)
    tree = _train_workdir_state(source)
    tree = {"params": tree["params"], "opt_state": tree["opt_state"]}
    ckpt = convert.to_keras_checkpoint(
      tree, like.layers, optimizer=like.optimizer, model_config=like.model_config
    )
  else:
    ckpt = convert.read(source)
    if template is not None:
      ckpt.model_config = convert.read(template).model_config
  convert.write(ckpt, out)
  return ckpt


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m adamjax.convert",
    description="Convert TensorFlow/Keras checkpoints (weights and Adam state) to Flax + "
    "adamjax and back, without TensorFlow and without executing the file.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  info = sub.add_parser("info", help="read and validate a checkpoint; print what it holds")
  info.add_argument("path", type=Path)
  to_jax = sub.add_parser(
    "to-jax",
    help="Keras/TF checkpoint -> Orbax checkpoint (params, batch_stats, adamjax opt_state, step)",
  )
  to_jax.add_argument("path", type=Path)
  to_jax.add_argument("out", type=Path, help="output directory (must not exist)")
  to_jax.add_argument("--overwrite", action="store_true")
  back = sub.add_parser(
    "to-keras",
    help="converted checkpoint or train/mnist.py workdir -> "
    ".keras or .weights.h5 with the optimizer state",
  )
  back.add_argument("source", type=Path)
  back.add_argument("out", type=Path, help="ends in .keras or .weights.h5")
  back.add_argument(
    "--template",
    type=Path,
    default=None,
    help="a Keras file of the same model (needed for a train/mnist.py workdir, "
    "or to supply the config a .keras output needs)",
  )
  args = parser.parse_args(argv)
  try:
    _run(args)
  except (convert.ConversionError, FileExistsError, OSError) as e:
    _error(e)
    return 2
  except Exception as e:  # noqa: BLE001 - the last boundary: one line, never a traceback
    _error(e, f"internal error ({type(e).__name__}), please report it: ")
    return 2
  return 0


def _error(e: BaseException, prefix: str = "") -> None:
  """One line on stderr, however long or odd the message (file data is already clipped)."""
  text = " ".join(str(e).split())
  if len(text) > 2000:
    text = text[:2000] + " ..."
  text = text.encode("utf-8", "backslashreplace").decode("utf-8")
  print(f"error: {prefix}{text}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
  if args.command == "info":
    ckpt = convert.read(args.path)
    print(_describe(ckpt))
    if ckpt.optimizer is None and ckpt.dropped_optimizer is None:
      _orbax.check_values(ckpt)
      _orbax.flax_variables(ckpt)
      print("to-jax: not possible, the checkpoint holds no optimizer state")
    elif ckpt.optimizer is None:
      _orbax.converted_tree(ckpt)
      print(f"to-jax: ready (weights only: the {ckpt.dropped_optimizer} state is not carried)")
    else:
      _orbax.converted_tree(ckpt)  # Every check to-jax makes: info passing means it works.
      print("to-jax: ready")
  elif args.command == "to-jax":
    ckpt = convert.read(args.path)
    _orbax.save_converted(ckpt, args.out, source=str(args.path), overwrite=args.overwrite)
    print(_describe(ckpt))
    print(f"wrote {args.out}")
  else:
    ckpt = to_keras(args.source, args.out, args.template)
    print(_describe(ckpt))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
