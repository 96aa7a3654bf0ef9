"""Every family of built layers against Keras on the TensorFlow backend (and on JAX).

The per-layer files compare each layer's options with Keras on the JAX backend bit for bit; this
one builds one model per family on the TensorFlow backend (a subprocess), converts the saved
``.keras`` and bounds the difference. TensorFlow's kernels (oneDNN convolutions, its own
transcendental functions) are not XLA's, so the bound is float32 rounding: 1e-6 of the output's
scale (max(1, max |Keras output|); the worst measured case is 2.0e-7, MultiHeadAttention, see
``benchmarks/results/convert_layers.md``). Against Keras-JAX's ``predict`` every case is
bit-identical (the jitted converted model runs the same XLA operations).
"""

import pytest

from adamjax.testing._layer_cases import compare_layer_cases


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  return {row["case"]: row for row in compare_layer_cases(tmp_path_factory.mktemp("layers_tf"))}


def test_every_registered_layer_class_has_a_case(rows):
  from adamjax.convert.layers import LAYERS

  covered = {c for row in rows.values() for c in row["classes"]}
  assert set(LAYERS) - covered == set()


def test_logits_match_keras_tensorflow(rows):
  worst = {name: row["vs_tf"] for name, row in rows.items() if row["vs_tf"] > 1e-6}
  assert worst == {}


def test_logits_bit_identical_to_keras_jax(rows):
  differing = {name: row["vs_jax"] for name, row in rows.items() if not row["bit_identical_jax"]}
  assert differing == {}
