"""The converter's zoo table (issue 13): every zoo model trained, converted and compared.

Runs ``tests/keras_zoo.py``'s :func:`check` on each model (Keras ``fit`` two steps with Adam,
``.keras`` saved, ``adamjax.convert.flax_model``, logits and one-step gradients against Keras on
the JAX backend, the Keras -> JAX -> Keras round trip) and prints one markdown row per model::

  python -m benchmarks.convert_zoo                       # all models, table to stdout
  python -m benchmarks.convert_zoo --output benchmarks/results/convert_zoo.md
  python -m benchmarks.convert_zoo --models unet,mobilenet_v2

A model that fails to convert gets a row saying why (and the script exits 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from tests import keras_zoo  # noqa: E402

COLUMNS = (
  "model",
  "layers",
  "params",
  "convert (s)",
  "max abs logit diff vs Keras-JAX",
  "bit-identical",
  "gradient max rel diff (mode)",
  "round trip (weights, optimizer, iterations)",
  "in the suite",
)


def row(r: keras_zoo.Report) -> list[str]:
  if r.roundtrip_optimizer is None:
    opt = f"weights only ({r.dropped_optimizer} not carried)"
  else:
    opt = "yes" if r.roundtrip_optimizer else "NO"
  trip = f"{'yes' if r.roundtrip_weights else 'NO'}, {opt}, {r.roundtrip_iterations}"
  return [
    r.name,
    str(r.layers),
    f"{r.params:,}",
    f"{r.convert_s:.2f}",
    f"{r.logit_max_abs:.3g}",
    "yes" if r.bit_identical else "no",
    f"{r.grad_max_rel:.2g} ({r.grad_mode})",
    trip,
    "yes" if keras_zoo.ZOO[r.name].in_suite else "no (too slow)",
  ]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", help="comma-separated zoo names (default: all)")
  parser.add_argument("--output", help="also write the table to this markdown file")
  args = parser.parse_args(argv)
  names = args.models.split(",") if args.models else list(keras_zoo.ZOO)
  unknown = [n for n in names if n not in keras_zoo.ZOO]
  if unknown:
    parser.error(f"unknown zoo models {unknown}; known: {', '.join(keras_zoo.ZOO)}")
  import keras

  lines = [
    "# The converter's zoo",
    "",
    "`python -m benchmarks.convert_zoo` (Keras "
    f"{keras.__version__}, JAX {jax.__version__}, {platform.machine()} CPU, "
    f"{time.strftime('%Y-%m-%d')}). Each model trained two steps by Keras `fit` (Adam unless "
    "named), saved as `.keras`, built by `adamjax.convert.flax_model`; logits in inference mode "
    "against Keras on the JAX backend, both jitted; one-step gradients of the compiled loss "
    "(plus regularization) per variable as max |ours - Keras| / max |Keras|, in training mode "
    "unless the model has dropout or noise; round trip: read -> adam_state -> "
    "keras_adam_state -> write `.keras` -> `keras.saving.load_model`, bit-identical weights and "
    "optimizer variables, and the reloaded `iterations`. Convert time: `read` + `flax_model`. "
    "Layers: the config's layers (nested models expanded, `keras.ops` nodes included, inputs "
    "not).",
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  print("\n".join(lines), flush=True)
  failed, start = 0, time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="convert_zoo_") as tmp:
    for name in names:
      try:
        cells = row(keras_zoo.check(name, os.path.join(tmp, name)))
      except Exception as e:  # noqa: BLE001 - a failing model is a row of the table
        failed += 1
        traceback.print_exc(file=sys.stderr)
        cells = [name] + ["-"] * (len(COLUMNS) - 2) + [f"FAILED: {type(e).__name__}: {e}"[:300]]
      line = "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
      lines.append(line)
      print(line, flush=True)
  lines += ["", f"{len(names)} models in {time.perf_counter() - start:.0f} s."]
  print(lines[-1])
  if args.output:
    with open(args.output, "w") as f:
      f.write("\n".join(lines) + "\n")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
