"""The layer table: one model per family of built layers against Keras-TF and Keras-JAX.

Usage: python -m benchmarks.convert_layers [--out benchmarks/results/convert_layers.md]

Builds every case of :mod:`adamjax.testing._layer_cases` on the TensorFlow backend (a
subprocess), converts it with ``adamjax.convert.flax_model`` and prints, per case, the layer
classes it holds, the largest difference from Keras-TF's and Keras-JAX's ``predict`` (scaled by
max(1, max |output|)) and whether the jitted converted model equals Keras-JAX bit for bit.
"""

import argparse
import os
import pathlib
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, help="also write the table here")
  args = parser.parse_args()
  from adamjax.testing._layer_cases import compare_layer_cases

  with tempfile.TemporaryDirectory() as folder:
    rows = compare_layer_cases(folder)
  lines = [
    "| case | layer classes | vs Keras-TF | vs Keras-JAX | bit-identical to Keras-JAX |",
    "|---|---|---|---|---|",
  ]
  for row in rows:
    lines.append(
      f"| {row['case']} | {', '.join(row['classes'])} | {row['vs_tf']:.1e} | "
      f"{row['vs_jax']:.1e} | {'yes' if row['bit_identical_jax'] else 'no'} |"
    )
  table = "\n".join(lines)
  print(table)
  if args.out:
    args.out.write_text(
      "# Built layers against Keras (CPU)\n\n`python -m benchmarks.convert_layers --out "
      f"{args.out}`\n\n{table}\n"
    )


if __name__ == "__main__":
  main()
