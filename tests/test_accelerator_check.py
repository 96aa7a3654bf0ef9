"""The one-shot accelerator check's harness runs end to end (tiny sizes, on whatever JAX sees)."""

from benchmarks import accelerator_check


def test_smoke_run_reports_parity_and_timings():
  results = accelerator_check.main(["--smoke"])
  first = results["parity"][0]
  assert first["check"] == "adamjax.adam vs optax.adam"
  assert (first["params"], first["m"], first["v"]) == (0, 0, 0)
  variants = {row["variant"] for row in results["steps"]}
  assert {"copy (same bytes)", "optax.adam per-leaf", "flat keras_adam"} <= variants
  assert all(row["ms"] > 0 for row in results["steps"])
