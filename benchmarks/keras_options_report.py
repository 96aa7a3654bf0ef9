"""Prints the option-by-option parity of keras_adam against the real Keras 3 (README's table).

The same configurations and comparisons as tests/test_keras_options.py (600 steps), reported
instead of asserted: max ulps and max |difference| over every step and element, for the
parameters, both moments and (with EMA) the moving average.

  python benchmarks/keras_options_report.py
"""

import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import test_keras_options as t  # noqa: E402
from reference_runners import max_abs_diff, max_ulps  # noqa: E402


def _cells(ours, ref):
  pairs = [
    ("params", ours["params"], ref.params),
    ("m", ours["mu"], ref.m),
    ("v", ours["nu"], ref.v),
  ]
  if "ema" in ours:
    pairs.append(("avg", ours["ema"], ref.extra["average"]))
  return " ".join(f"{k}={max_ulps(a, b)}({max_abs_diff(a, b):.1e})" for k, a, b in pairs)


def main():
  print(f"{t.STEPS} steps; cells: quantity=max ulps(max |diff|)")
  for name in sorted(t.CONFIGS):
    rows = []
    if name not in t.NOT_POW2 | t.ACCUMULATING:
      rows.append(("vs Keras-JAX eager", _cells(t._ours(name), t._keras(name, "jax"))))
    rows.append(
      ("fused vs Keras-JAX jit", _cells(t._ours(name, fused=True), t._keras(name, "jax", jit=True)))
    )
    rows.append(("vs Keras-TF", _cells(t._ours(name), t._keras(name, "tensorflow"))))
    for label, cells in rows:
      print(f"{name:28s} {label:24s} {cells}")


if __name__ == "__main__":
  main()
