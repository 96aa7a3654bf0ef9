"""Prints the measured parity of every preset against the real libraries (the README's table).

Runs the same comparisons as tests/test_keras_tf_parity.py and tests/test_optax_parity.py, but
reports the figures instead of asserting bounds: max ulps and max |difference| per element over
every step, for parameters and both moments.

  python -m benchmarks.parity_report [--steps 1000] [--seeds 0 1 2]   # from the repository root
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # Before Keras is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import adamjax  # noqa: E402
from adamjax.testing import (  # noqa: E402
  make_gradient_sequence,
  make_params,
  max_abs_diff,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_optax,
  run_tf1_adam,
)

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": ()}


def _row(name, ours, ref, rows):
  pairs = [
    ("params", ours["params"], ref.params),
    ("m", ours["mu"], ref.m),
    ("v", ours["nu"], ref.v),
  ]
  cells = [(max_ulps(a, b), max_abs_diff(a, b)) for _, a, b in pairs]
  rows.setdefault(name, []).append(cells)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  args = parser.parse_args()
  rows = {}
  for seed in args.seeds:
    params = make_params(SHAPES, seed)
    grads = make_gradient_sequence(SHAPES, args.steps, seed + 1)
    for label, config in [
      ("default", {}),
      ("amsgrad", {"amsgrad": True}),
      ("custom", {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6}),
    ]:
      ams = ("mu", "nu", "nu_max") if config.get("amsgrad") else ("mu", "nu")
      ours = run_optax(adamjax.keras_adam(**config), params, grads, fields=ams)
      ours_eager = run_optax(adamjax.keras_adam(**config), params, grads, jit=False, fields=ams)
      fused = run_optax(
        adamjax.keras_adam(**config, fused_multiply_add=True), params, grads, fields=ams
      )
      k_eager = run_keras_jax(params, grads, config, jit=False)
      k_jit = run_keras_jax(params, grads, config, jit=True)
      k_tf = run_keras_tf(params, grads, config)
      _row(f"keras_adam[{label}] jit vs Keras-JAX eager", ours, k_eager, rows)
      _row(f"keras_adam[{label}] eager vs Keras-JAX eager", ours_eager, k_eager, rows)
      _row(f"keras_adam[{label}] jit vs Keras-TF", ours, k_tf, rows)
      _row(f"keras_adam[{label}] fused jit vs Keras-JAX jit", fused, k_jit, rows)
      _row(f"keras_adam[{label}] fused jit vs Keras-TF", fused, k_tf, rows)
      _row(
        f"(Keras-JAX jit vs Keras-TF)[{label}]",
        {"params": k_jit.params, "mu": k_jit.m, "nu": k_jit.v},
        k_tf,
        rows,
      )
      if label == "default":
        control = run_optax(optax.adam(1e-3, eps=1e-7), params, grads)
        _row("optax.adam(eps=1e-7) vs Keras-TF (control)", control, k_tf, rows)
    for label, config in [
      ("default", (0.001, 0.9, 0.999, 1e-8)),
      ("custom", (0.01, 0.8, 0.99, 1e-6)),
    ]:
      ref = run_tf1_adam(params, grads, *config)
      _row(
        f"tf1_adam[{label}] jit vs TF1 AdamOptimizer",
        run_optax(adamjax.tf1_adam(*config), params, grads),
        ref,
        rows,
      )
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      p = {k: v.astype(dtype) for k, v in params.items()}
      g = {k: v.astype(dtype) for k, v in grads.items()}
      for label, kw in [
        ("default", {}),
        ("nesterov", {"nesterov": True}),
        ("eps_root", {"eps_root": 1e-8}),
        ("mu_bf16", {"mu_dtype": jnp.bfloat16}),
      ]:
        a = run_optax(adamjax.adam(1e-3, **kw), p, g)
        b = run_optax(optax.adam(1e-3, **kw), p, g)
        same = all(np.array_equal(a[f][k], b[f][k], equal_nan=True) for f in b for k in b[f])
        rows.setdefault(
          f"adam[{label}, {jnp.dtype(dtype).name}] vs optax.adam (bit-identical)", []
        ).append(same)
  print(f"{args.steps} steps, seeds {args.seeds}; cells: max ulps (max |diff|) over all steps")
  print(f"{'comparison':58s} {'params':>20s} {'m':>20s} {'v':>20s}")
  for name, results in rows.items():
    if isinstance(results[0], bool):
      print(f"{name:58s} {'yes' if all(results) else 'NO'}")
      continue
    worst = [max((r[i] for r in results), key=lambda c: c[0]) for i in range(3)]
    print(f"{name:58s} " + " ".join(f"{u:>8d} ({d:9.2e})" for u, d in worst))


if __name__ == "__main__":
  main()
