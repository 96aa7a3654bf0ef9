"""Smoke test of benchmarks/convert_applications.py: its functions on one tiny application
(MobileNetV2, alpha=0.35, 32x32 input, 10 classes), end to end in seconds. The converted model's
jitted logits must equal Keras-JAX's jitted call and ``predict`` on the same batch bit for bit
(both sides compile the same lax operations), and every timing must be a real measurement."""

import jax.numpy as jnp
import numpy as np

import adamjax.convert as C
from benchmarks import convert_applications as bench

TINY = bench.AppConfig(
  "MobileNetV2", (("input_shape", (32, 32, 3)), ("alpha", 0.35), ("classes", 10))
)


def test_tiny_application_converts_matches_is_timed_and_tabled(tmp_path):
  lines = []
  result = bench.run_app(
    TINY, (2,), repeats=2, warmup=1, convert_repeats=1, workdir=str(tmp_path), log=lines.append
  )
  assert result["params"] > 0 and lines
  assert len(result["convert"]["read_s"]) == len(result["convert"]["flax_model_s"]) == 1
  d = result["batches"][2]
  parity = d["parity"]
  assert parity["max_abs_logit"] > 0  # the logits are not all zero (random init, random input)
  for ref in ("Keras predict", "Keras jit call"):
    assert parity[ref]["identical"], (ref, parity[ref])
    assert parity[ref]["max_abs_diff"] == 0.0
  # The converted model compiles to the same program as Keras's own jitted call.
  assert d["hlo"]["same_hlo"], d["hlo"]["instructions"]
  assert d["hlo"]["cost"]["ours"]["flops"] > 0
  timing = d["timing"]
  assert set(timing["times_s"]) == {"ours", "ours end to end", "Keras predict", "Keras jit call"}
  for times in timing["times_s"].values():
    assert len(times) == 2 and all(np.isfinite(t) and t > 0 for t in times)
  text = bench.report([result], "python -m benchmarks.convert_applications --test", 2, 1)
  assert "MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, classes=10)" in text
  assert "python -m benchmarks.convert_applications --test" in text
  assert "| yes |" in text

  # The per-call host overhead table, on the file run_app saved.
  row = bench.call_overhead(
    C.flax_model(str(tmp_path / "MobileNetV2.keras")), jnp.float32(1.0), repeats=2
  )
  assert row["state leaves"] > 100  # MobileNetV2: kernels, BatchNorm scale/offset/mean/var
  timed = {k: v for k, v in row.items() if k != "state leaves"}
  assert len(timed) == 5 and all(np.isfinite(v) and v > 0 for v in timed.values())
  text = bench.overhead_report({"tiny": row}, "python -m benchmarks.convert_applications x", 2)
  assert f"tiny ({row['state leaves']} leaves)" in text and "`nnx.jit(f)(model, x)`" in text
