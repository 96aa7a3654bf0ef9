"""keras.applications through the converter: conversion time, logit parity, forward-pass speed.

For each application (ResNet50, MobileNetV2, EfficientNetB0, DenseNet121; ``weights=None``, the
default 224x224x3 input, ``classifier_activation=None`` so that the outputs compared are logits,
compiled with Adam and saved as ``.keras``) this harness measures, in one process on Keras's JAX
backend:

- conversion: ``adamjax.convert.read(path)`` and ``adamjax.convert.flax_model(ckpt)``, each the
  median of ``--convert-repeats`` runs;
- parity: the converted model's jitted forward pass against Keras-JAX ``model.predict(x,
  batch_size=B)`` and against the jitted ``model.stateless_call(..., training=False)`` on the
  same batch (largest absolute difference, and whether the arrays are bit-identical);
- speed at each batch size: ours (``nnx.split`` once, a ``jax.jit`` of ``nnx.merge(graphdef,
  state)(x)``, compiled once, input already on the device, ``block_until_ready``), ours end to end
  (NumPy in, NumPy out, as ``predict`` is), Keras ``model.predict(x, batch_size=B, verbose=0)``
  and the jitted Keras call. Every variant is warmed up, then the variants are timed in
  interleaved rounds (one call of each per round, the order rotated from round to round, so
  that load from other processes on a shared machine falls on all of them alike); the table
  gives medians, the ratio of medians and the spread of the per-round ratios;
- the compiled programs: our optimized HLO against the jitted Keras call's, instruction by
  instruction, with XLA's cost analysis.

  python -m benchmarks.convert_applications             # all four, batch 32 and 1; writes
                                                        # benchmarks/results/convert_applications.md
  python -m benchmarks.convert_applications --apps MobileNetV2 --batches 1 --repeats 3 --no-write
  python -m benchmarks.convert_applications --call-overhead --repeats 20   # appends the
                                                        # per-call overhead table (below)

A last table (``--call-overhead``) times the host work per call of the ways to call the
converted model (``nnx.split`` once and ``jax.jit``, flat leaves, ``nnx.jit``,
``nnx.cached_partial``) on a body that costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np

RESULTS = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "results", "convert_applications.md"
)
APPS = ("ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121")
# Inputs in the range each application's own preprocessing produces: EfficientNet rescales
# inside the model (0..255 in), the others take -1..1 (or caffe-style centred values).
INPUT_RANGE = {"EfficientNetB0": (0.0, 255.0)}


@dataclasses.dataclass(frozen=True)
class AppConfig:
  """One application: the ``keras.applications`` constructor name and its keyword arguments."""

  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
    return f"{self.name}({extra})" if extra else self.name


def build_and_save(config: AppConfig, path: str):
  """Builds the application (``weights=None``), compiles it with Adam, saves it to ``path``."""
  import keras

  kwargs = {"weights": None, "classifier_activation": None, **dict(config.kwargs)}
  with _keras_broadcasting():
    model = getattr(keras.applications, config.name)(**kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.save(path)
  return model


def _keras_broadcasting():
  """Keras adds its biases by implicit rank promotion, which strict JAX settings (the test
  suite's) refuse; Keras's own calls run with it allowed, the converted model's do not."""
  import jax

  return jax.numpy_rank_promotion("allow")


def _allowing(fn: Callable) -> Callable:
  def call(*args):
    with _keras_broadcasting():
      return fn(*args)

  return call


def time_convert(path: str, repeats: int) -> dict[str, Any]:
  """Seconds for ``read`` and ``flax_model`` (each call timed alone), and the last model built."""
  import adamjax.convert as C

  reads, builds, model = [], [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    ckpt = C.read(path)
    t1 = time.perf_counter()
    model = C.flax_model(ckpt)
    t2 = time.perf_counter()
    reads.append(t1 - t0)
    builds.append(t2 - t1)
  return {"read_s": reads, "flax_model_s": builds, "model": model}


def forward_functions(keras_model, flax_model, batch: int) -> dict[str, Callable[[Any], Any]]:
  """Each variant as ``fn(x) -> output`` (NumPy or device array); compiled on first use."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(flax_model)

  @jax.jit
  def ours(state, x):
    return nnx.merge(graphdef, state)(x, training=False)

  @jax.jit
  def keras_jit(trainable, non_trainable, x):
    return keras_model.stateless_call(trainable, non_trainable, x, training=False)[0]

  def keras_call(x):
    # The variables' current arrays, read at each call: predict donates (and replaces) them.
    trainable = [v.value for v in keras_model.trainable_variables]
    non_trainable = [v.value for v in keras_model.non_trainable_variables]
    return keras_jit(trainable, non_trainable, x).block_until_ready()

  return {
    "ours": lambda x: ours(state, x).block_until_ready(),
    "ours end to end": lambda x: np.asarray(ours(state, jax.device_put(x))),
    "Keras predict": _allowing(lambda x: keras_model.predict(x, batch_size=batch, verbose=0)),
    "Keras jit call": _allowing(keras_call),
  }


def _canonical_hlo(text: str) -> list[str]:
  """Optimized HLO instructions with names, parameter numbers and metadata stripped, sorted:
  two programs that differ only in how their arguments are named and ordered compare equal."""
  import re

  lines = []
  for line in text.splitlines():
    if "%" not in line or line.lstrip().startswith(("HloModule", "ENTRY")):
      continue
    line = re.sub(r", (metadata|frontend_attributes|backend_config|sharding)=\{[^}]*\}", "", line)
    line = re.sub(r"parameter\(\d+\)", "parameter(N)", line)
    line = re.sub(r"%[\w.\-]+", "%v", line.strip())
    lines.append(re.sub(r"\b[A-Za-z_][\w.\-]*(?=: )", "p", line))  # fusion parameter names
  return sorted(lines)


def compare_hlo(keras_model, flax_model, x) -> dict[str, Any]:
  """Compiles our forward pass and the jitted Keras call for ``x`` (seconds each) and compares
  their optimized HLO (:func:`_canonical_hlo`) and XLA's cost analysis."""
  import collections

  import jax
  from flax import nnx

  graphdef, state = nnx.split(flax_model)
  ours = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, training=False))
  keras_jit = jax.jit(lambda t, n, x: keras_model.stateless_call(t, n, x, training=False)[0])
  t0 = time.perf_counter()
  ours_compiled = ours.lower(state, x).compile()
  t1 = time.perf_counter()
  with _keras_broadcasting():
    keras_compiled = keras_jit.lower(
      [v.value for v in keras_model.trainable_variables],
      [v.value for v in keras_model.non_trainable_variables],
      x,
    ).compile()
  t2 = time.perf_counter()
  a, b = _canonical_hlo(ours_compiled.as_text()), _canonical_hlo(keras_compiled.as_text())

  def cost(c):
    c = c.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return {k: float(c.get(k, float("nan"))) for k in ("flops", "bytes accessed")}

  return {
    "compile_s": {"ours": t1 - t0, "Keras jit call": t2 - t1},
    "instructions": {"ours": len(a), "Keras jit call": len(b)},
    "same_hlo": a == b,
    "only_in": {
      "ours": sum((collections.Counter(a) - collections.Counter(b)).values()),
      "Keras jit call": sum((collections.Counter(b) - collections.Counter(a)).values()),
    },
    "cost": {"ours": cost(ours_compiled), "Keras jit call": cost(keras_compiled)},
  }


def call_overhead(flax_model, x, repeats: int) -> dict[str, Any]:
  """Host microseconds per call (median of ``repeats``) of the ways to call a jitted function
  of the converted model, timed on a body that costs nothing (``x + 1``), so that only the
  Python work per call (graph traversal, pytree flattening, dispatch) is measured."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(flax_model)
  leaves, treedef = jax.tree.flatten(state)
  cheap = jax.jit(lambda state, x: x + 1.0)
  cheap_leaves = jax.jit(lambda leaves, x: (jax.tree.unflatten(treedef, leaves), x + 1.0)[1])
  module_jit = nnx.jit(lambda model, x: x + 1.0)
  cached = nnx.cached_partial(module_jit, flax_model)
  variants = {
    "nnx.split(model)": lambda: nnx.split(flax_model),
    "jax.jit(f)(state, x), state from nnx.split once": lambda: cheap(state, x),
    "jax.jit(f)(leaves, x), jax.tree.flatten(state) once": lambda: cheap_leaves(leaves, x),
    "nnx.jit(f)(model, x)": lambda: module_jit(flax_model, x),
    "nnx.cached_partial(nnx.jit(f), model)(x)": lambda: cached(x),
  }
  out = {"state leaves": len(leaves)}
  for name, fn in variants.items():
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    out[name] = 1e6 * statistics.median(times)
  return out


def make_batch(config: AppConfig, input_shape: tuple[int, ...], batch: int, seed: int = 0):
  lo, hi = INPUT_RANGE.get(config.name, (-1.0, 1.0))
  rng = np.random.default_rng(seed)
  return rng.uniform(lo, hi, size=(batch, *input_shape)).astype(np.float32)


def check_parity(fns: dict[str, Callable], x_host: np.ndarray, x_device) -> dict[str, Any]:
  """Our output against Keras predict and the jitted Keras call: max |diff|, bit-identical."""
  ours = np.asarray(fns["ours"](x_device))
  out = {"max_abs_logit": float(np.max(np.abs(ours)))}
  for name in ("Keras predict", "Keras jit call"):
    ref = np.asarray(fns[name](x_host if name == "Keras predict" else x_device))
    out[name] = {
      "max_abs_diff": float(np.max(np.abs(ours - ref))),
      "identical": bool(np.array_equal(ours, ref)),
    }
  return out


def time_forward(
  fns: dict[str, Callable], x_host: np.ndarray, x_device, repeats: int, warmup: int
) -> dict[str, Any]:
  """First-call seconds (compilation included), then ``repeats`` interleaved timed rounds
  (one call of each variant per round, the order rotated each round)."""
  first, times = {}, {name: [] for name in fns}
  inputs = {
    name: x_host if name in ("Keras predict", "ours end to end") else x_device for name in fns
  }
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn(inputs[name])
    first[name] = time.perf_counter() - t0
    for _ in range(warmup):
      fn(inputs[name])
  names = list(fns)
  for r in range(repeats):
    # The order rotates from round to round, so that no variant always runs first (after
    # another variant's allocations) or last.
    for name in names[r % len(names) :] + names[: r % len(names)]:
      fn = fns[name]
      t0 = time.perf_counter()
      fn(inputs[name])
      times[name].append(time.perf_counter() - t0)
  return {"first_s": first, "times_s": times}


def run_app(
  config: AppConfig,
  batches: tuple[int, ...],
  *,
  repeats: int,
  warmup: int,
  convert_repeats: int,
  workdir: str,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Every measurement for one application (see the module docstring)."""
  import jax

  path = os.path.join(workdir, f"{config.name}.keras")
  keras_model = build_and_save(config, path)
  input_shape = tuple(keras_model.input_shape[1:])
  log(f"{config.label}: {keras_model.count_params():,} parameters, input {input_shape}")
  conv = time_convert(path, convert_repeats)
  flax_model = conv.pop("model")
  log(
    f"  read {statistics.median(conv['read_s']):.2f} s, flax_model "
    f"{statistics.median(conv['flax_model_s']):.2f} s (median of {convert_repeats})"
  )
  result = {
    "label": config.label,
    "params": keras_model.count_params(),
    "file_mb": os.path.getsize(path) / 2**20,
    "convert": conv,
    "batches": {},
  }
  for batch in batches:
    x_host = make_batch(config, input_shape, batch)
    x_device = jax.device_put(x_host)
    fns = forward_functions(keras_model, flax_model, batch)
    timing = time_forward(fns, x_host, x_device, repeats, warmup)
    parity = check_parity(fns, x_host, x_device)
    hlo = compare_hlo(keras_model, flax_model, x_device)
    result["batches"][batch] = {"timing": timing, "parity": parity, "hlo": hlo}
    med = {k: statistics.median(v) for k, v in timing["times_s"].items()}
    log(
      f"  batch {batch}: "
      + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items())
      + f"; vs predict max|diff| {parity['Keras predict']['max_abs_diff']:.3g}"
      + f" identical {parity['Keras predict']['identical']}; same optimized HLO as the"
      + f" jitted Keras call {hlo['same_hlo']}"
    )
  return result


def _ratio(num: list[float], den: list[float]) -> str:
  """Ratio of the medians, then [median min-max] of the per-round ratios."""
  per = [n / d for n, d in zip(num, den, strict=True)]
  med = statistics.median
  return f"{med(num) / med(den):.2f} [{med(per):.2f} {min(per):.2f}-{max(per):.2f}]"


def report(results: list[dict[str, Any]], command: str, repeats: int, warmup: int) -> str:
  """The results file: environment, the exact command, conversion, parity and speed tables."""
  import jax
  import keras

  med = statistics.median
  lines = [
    "# keras.applications through the converter: conversion time, parity, forward speed",
    "",
    "Command (written by the harness itself; 2-core CPU shared with other jobs, so compare the",
    "ratios, which come from interleaved rounds within this one run, not the absolute times):",
    "",
    f"    {command}",
    "",
    f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
    f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), keras "
    f"{keras.__version__} (JAX backend). Models: `keras.applications.<Name>(weights=None, "
    "classifier_activation=None)` (default input 224x224x3, 1000 classes), compiled with Adam, "
    "saved as `.keras`.",
    "",
    "## Conversion (seconds, median of the repeats)",
    "",
    "| model | params | file MiB | `read` | `flax_model` | total |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    c = r["convert"]
    rd, fm = med(c["read_s"]), med(c["flax_model_s"])
    lines.append(
      f"| {r['label']} | {r['params']:,} | {r['file_mb']:.0f} | {rd:.2f} | {fm:.2f} | "
      f"{rd + fm:.2f} |"
    )
  lines += [
    "",
    "## Logits: ours (jitted) against Keras-JAX on the same batch",
    "",
    "| model | batch | max abs logit | vs `predict`: max abs diff | identical | "
    "vs jitted Keras call: max abs diff | identical |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for b, d in r["batches"].items():
      p = d["parity"]
      kp, kj = p["Keras predict"], p["Keras jit call"]
      lines.append(
        f"| {r['label']} | {b} | {p['max_abs_logit']:.3g} | {kp['max_abs_diff']:.3g} | "
        f"{'yes' if kp['identical'] else 'no'} | {kj['max_abs_diff']:.3g} | "
        f"{'yes' if kj['identical'] else 'no'} |"
      )
  lines += [
    "",
    f"## Forward pass (ms, median of {repeats} interleaved rounds after {warmup} warm-up calls)",
    "",
    "`ours`: the jitted `nnx.merge(graphdef, state)(x)`, device input, `block_until_ready`; "
    "`ours e2e`: the same with NumPy in and NumPy out; `predict`: `model.predict(x, "
    "batch_size=B, verbose=0)`; `Keras jit`: jitted `model.stateless_call(..., training=False)`. "
    "Ratios > 1: ours is faster; each is the ratio of the medians, then in brackets the median "
    "[min-max] of the per-round ratios (one call of each variant per round, in an order "
    "rotated each round). `ours` and `ours e2e` run the same executable. The jitted "
    "Keras call compiles the same HLO as ours, or nearly (table below), so its spread around "
    "1.00 is the noise of this machine. First call: seconds, compilation included.",
    "",
    "| model | batch | ours | ours e2e | predict | Keras jit | predict / ours | "
    "predict / ours e2e | Keras jit / ours | first call ours / predict / Keras jit (s) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for b, d in r["batches"].items():
      times = d["timing"]["times_s"]
      t = {k: med(v) for k, v in times.items()}
      f = d["timing"]["first_s"]

      def ratio(num, den, times=times):
        return _ratio(times[num], times[den])

      lines.append(
        f"| {r['label']} | {b} | {1e3 * t['ours']:.1f} | {1e3 * t['ours end to end']:.1f} | "
        f"{1e3 * t['Keras predict']:.1f} | {1e3 * t['Keras jit call']:.1f} | "
        f"{ratio('Keras predict', 'ours')} | {ratio('Keras predict', 'ours end to end')} | "
        f"{ratio('Keras jit call', 'ours')} | {f['ours']:.1f} / {f['Keras predict']:.1f} / "
        f"{f['Keras jit call']:.1f} |"
      )
  lines += [
    "",
    "## Compiled programs: ours against the jitted Keras call",
    "",
    "Optimized HLO compared instruction by instruction after stripping names, parameter numbers "
    "and metadata (sorted, so only the arguments' order and names may differ); GFLOP and GB "
    "from XLA's cost analysis; compile seconds from `lower(...).compile()`.",
    "",
    "| model | batch | same optimized HLO | instructions ours / Keras | only in ours / Keras | "
    "GFLOP ours / Keras | GB accessed ours / Keras | compile s ours / Keras |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for b, d in r["batches"].items():
      h = d["hlo"]
      o, k = h["cost"]["ours"], h["cost"]["Keras jit call"]
      lines.append(
        f"| {r['label']} | {b} | {'yes' if h['same_hlo'] else 'no'} | "
        f"{h['instructions']['ours']} / {h['instructions']['Keras jit call']} | "
        f"{h['only_in']['ours']} / {h['only_in']['Keras jit call']} | "
        f"{o['flops'] / 1e9:.1f} / {k['flops'] / 1e9:.1f} | "
        f"{o['bytes accessed'] / 1e9:.2f} / {k['bytes accessed'] / 1e9:.2f} | "
        f"{h['compile_s']['ours']:.1f} / {h['compile_s']['Keras jit call']:.1f} |"
      )
  return "\n".join(lines) + "\n"


def overhead_report(rows: dict[str, dict[str, Any]], command: str, repeats: int) -> str:
  """The call-overhead section (appended to the results file by ``--call-overhead``)."""
  names = [k for k in next(iter(rows.values())) if k != "state leaves"]
  lines = [
    "",
    "## Per-call host overhead of the ways to call the converted model (µs)",
    "",
    "Command:",
    "",
    f"    {command}",
    "",
    f"Median of {repeats} calls of a jitted function whose body costs nothing (`x + 1`, x a "
    "scalar), with the model or its state as argument, so only the Python work per call "
    "(graph traversal, pytree flattening, dispatch) is timed; `nnx.split(model)` alone for "
    "reference. Compute comes on top of this.",
    "",
    "| way to call | "
    + " | ".join(f"{a} ({r['state leaves']} leaves)" for a, r in rows.items())
    + " |",
    "|---|" + "---|" * len(rows),
  ]
  for name in names:
    lines.append(f"| `{name}` | " + " | ".join(f"{r[name]:,.0f}" for r in rows.values()) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--apps", nargs="+", default=list(APPS), choices=APPS)
  parser.add_argument("--batches", nargs="+", type=int, default=[32, 1])
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
  parser.add_argument("--warmup", type=int, default=2, help="calls after the first")
  parser.add_argument("--convert-repeats", type=int, default=3)
  parser.add_argument("--output", default=RESULTS)
  parser.add_argument("--no-write", action="store_true", help="print the report only")
  parser.add_argument(
    "--call-overhead",
    action="store_true",
    help="only the per-call host overhead table, appended to --output",
  )
  args = parser.parse_args(argv)
  command = "python -m benchmarks.convert_applications " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  if args.call_overhead:
    import jax.numpy as jnp

    import adamjax.convert as C

    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
      for name in args.apps:
        path = os.path.join(workdir, f"{name}.keras")
        build_and_save(AppConfig(name), path)
        rows[name] = call_overhead(C.flax_model(path), jnp.float32(1.0), args.repeats)
        print(name, rows[name], flush=True)
    text = overhead_report(rows, command.strip(), args.repeats)
    print(text)
    if not args.no_write:
      with open(args.output, "a") as f:
        f.write(text)
    return [rows]
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.apps:
      results.append(
        run_app(
          AppConfig(name),
          tuple(args.batches),
          repeats=args.repeats,
          warmup=args.warmup,
          convert_repeats=args.convert_repeats,
          workdir=workdir,
          log=lambda s: print(s, flush=True),
        )
      )
  text = report(results, command.strip(), args.repeats, args.warmup)
  print(text)
  if not args.no_write:
    with open(args.output, "w") as f:
      f.write(text)
  return results


if __name__ == "__main__":
  main()
