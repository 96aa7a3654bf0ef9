"""Prints the option-by-option parity of keras_adam against the real Keras 3 (README's table).

The configurations tests/test_keras_options.py asserts (`adamjax.testing.KERAS_ADAM_OPTIONS`,
600 steps), reported instead of asserted: max ulps and max |difference| over every step and
element, for the parameters, both moments and (with EMA) the moving average.

  python -m benchmarks.keras_options_report   # from the repository root
"""

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # Before Keras is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from adamjax.testing import (  # noqa: E402
  KERAS_ADAM_OPTIONS,
  KERAS_OPTIONS_ACCUMULATING,
  KERAS_OPTIONS_NOT_POW2,
  keras_adam_for_option,
  keras_option_config,
  make_gradient_sequence,
  make_params,
  max_abs_diff,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_optax,
)

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": ()}
STEPS = 600


@functools.cache
def _inputs():
  return make_params(SHAPES, 3), make_gradient_sequence(SHAPES, STEPS, 4)


def _ours(name, fused=False):
  fields = ("mu", "nu") + (("ema",) if KERAS_ADAM_OPTIONS[name].get("use_ema") else ())
  tx = keras_adam_for_option(name, fused_multiply_add=fused)
  return run_optax(tx, *_inputs(), fields=fields)


def _keras(name, backend, jit=False):
  params, grads = _inputs()
  if backend == "tensorflow":
    return run_keras_tf(params, grads, keras_option_config(name))
  return run_keras_jax(params, grads, keras_option_config(name), jit=jit)


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
  print(f"{STEPS} steps; cells: quantity=max ulps(max |diff|)")
  for name in sorted(KERAS_ADAM_OPTIONS):
    rows = []
    if name not in KERAS_OPTIONS_NOT_POW2 | KERAS_OPTIONS_ACCUMULATING:
      rows.append(("vs Keras-JAX eager", _cells(_ours(name), _keras(name, "jax"))))
    rows.append(
      ("fused vs Keras-JAX jit", _cells(_ours(name, fused=True), _keras(name, "jax", True)))
    )
    rows.append(("vs Keras-TF", _cells(_ours(name), _keras(name, "tensorflow"))))
    for label, cells in rows:
      print(f"{name:28s} {label:24s} {cells}")


if __name__ == "__main__":
  main()
