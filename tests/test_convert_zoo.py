"""The converter's zoo (issue 13): small Keras 3 models of the kinds people port, end to end.

For every model of ``keras_zoo.ZOO``: Keras trains it two steps with ``fit`` (Adam, so the
optimizer has state), saves ``.keras``; ``adamjax.convert.flax_model`` builds it; its logits in
inference mode match Keras on the JAX backend (both jitted: bit-identical unless the entry states
a bound and why); one-step gradients of the compiled loss (plus the regularization losses) w.r.t.
the trainable variables match Keras's (``compute_loss_and_updates`` under ``jax.grad``) to the
entry's relative bound; and read -> adam_state -> keras_adam_state -> write .keras ->
``keras.saving.load_model`` gives Keras's weights and optimizer variables (``iterations``
included) bit for bit. A few models are also run by Keras on TensorFlow (a subprocess).

Gradient bound: each variable's max |ours - Keras| over its max |Keras|. Both sides differentiate
the same float32 operations; the loss is ours (optax / jnp, as a user writes it; averaged over the
unmasked entries where an output carries a mask, as Keras's ``apply_mask``) against Keras's
compiled loss object, whose reductions sum in another order: a few float32 ulps of the loss
(measured: at most 3e-7 relative, most models 0), far below the 1e-5 bound. Models with dropout
or noise compare gradients in inference mode (Keras's seed generator and ``nnx.Rngs`` draw
different masks); the others in training mode (BatchNormalization on batch statistics).

MobileNetV2 and EfficientNetB0 (``in_suite=False``: about a minute of CPU each) are run by
``python -m benchmarks.convert_zoo`` only.
"""

from __future__ import annotations

from pathlib import Path

import keras_zoo
import numpy as np
import pytest

from adamjax import testing

pytestmark = pytest.mark.filterwarnings(
  # Keras's own warning for the zoo's text_conv1d (Conv1D after Embedding(mask_zero)).
  # Its name carries Keras's global counter (conv1d_6) when other tests built Conv1Ds first.
  "ignore:Layer 'conv1d(_[0-9]+)?' \\(of type Conv1D\\) was passed an input with a mask:UserWarning"
)

# Models the converter cannot build yet, with the cause (file, Keras's behaviour, ours).
XFAIL: dict[str, str] = {}

# Keras on TensorFlow: float32 kernels other than XLA's (oneDNN convolutions and matmuls, TF's
# LSTM and softmax), so the logits agree to float32 rounding of sums, not bit for bit. Measured
# max |ours - Keras-TF|: cnn_bn_dropout 1.8e-7, bilstm_tagger 7.5e-9, transformer_encoder
# 1.5e-7, text_masked_pool 1.9e-9 (unet, not in the list: 3.6e-7), logits of magnitude ~1 to 10.
# Four of the cheaper models (under xdist a worker may train them again for this test).
TF_MODELS = ("cnn_bn_dropout", "bilstm_tagger", "transformer_encoder", "text_masked_pool")
TF_RTOL = 1e-5  # max |ours - Keras-TF| <= TF_RTOL * max(1, max |Keras-TF|)


@pytest.fixture(scope="module")
def zoo_report(tmp_path_factory):
  """``name -> keras_zoo.Report``, each model trained and checked once per module."""
  cache: dict[str, keras_zoo.Report] = {}

  def get(name: str) -> keras_zoo.Report:
    if name not in cache:
      cache[name] = keras_zoo.check(name, tmp_path_factory.mktemp(name))
    return cache[name]

  return get


def _params():
  for name, entry in keras_zoo.ZOO.items():
    if not entry.in_suite:
      continue
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
    yield pytest.param(name, marks=marks, id=name)


def test_the_zoo_is_diverse():
  assert sum(entry.in_suite for entry in keras_zoo.ZOO.values()) >= 20
  kinds = {"text", "transformer", "lstm", "gru", "unet", "mobilenet", "efficientnet", "mixed"}
  assert all(any(k in name for name in keras_zoo.ZOO) for k in kinds)


@pytest.mark.parametrize("name", list(_params()))
def test_zoo_model(name, zoo_report):
  entry = keras_zoo.ZOO[name]
  r = zoo_report(name)
  if entry.logit_bound == 0.0:
    assert r.bit_identical, f"{name}: logits differ from Keras-JAX by {r.logit_max_abs:.3g}"
  else:
    assert r.logit_max_abs <= entry.logit_bound, (name, r.logit_max_abs, entry.why)
  assert r.grad_max_rel <= entry.grad_rtol, (name, r.grad_mode, r.grad_max_rel)
  assert r.roundtrip_weights, f"{name}: Keras -> JAX -> Keras changed a weight"
  assert r.keras_iterations == 2
  if entry.optimizer == "Adam":
    assert r.dropped_optimizer is None
    assert r.roundtrip_optimizer, f"{name}: an optimizer variable changed on the round trip"
    assert r.roundtrip_iterations == 2
  else:
    assert r.dropped_optimizer == entry.optimizer
    assert r.roundtrip_optimizer is None


def test_zoo_against_keras_tensorflow(zoo_report):
  reports = [zoo_report(name) for name in TF_MODELS]
  arrays = {f"{i}_x{j}": x for i, r in enumerate(reports) for j, x in enumerate(r.inputs)}
  spec = {"models": [r.path for r in reports], "inputs": [len(r.inputs) for r in reports]}
  out = testing.call_in_keras_backend(
    "tensorflow", Path(keras_zoo.__file__), "tf_logits", arrays, spec
  )
  for i, r in enumerate(reports):
    for j, ours in enumerate(r.our_logits):
      tf = out[f"{i}_y{j}"]
      assert tf.shape == ours.shape, (r.name, tf.shape, ours.shape)
      scale = max(1.0, float(np.max(np.abs(tf))))
      print(f"{r.name} output {j}: max |ours - Keras-TF| = {np.max(np.abs(ours - tf)):.3g}")
      np.testing.assert_allclose(ours, tf, rtol=0, atol=TF_RTOL * scale, err_msg=r.name)


def test_benchmark_table(tmp_path, capsys):
  from benchmarks import convert_zoo

  out = tmp_path / "zoo.md"
  assert convert_zoo.main(["--models", "sgd_cnn", "--output", str(out)]) == 0
  table = out.read_text()
  (row,) = [line for line in table.splitlines() if line.startswith("| sgd_cnn |")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert len(cells) == len(convert_zoo.COLUMNS)
  assert cells[5] == "yes" and "SGD not carried" in cells[7]
  assert row in capsys.readouterr().out
  with pytest.raises(SystemExit):
    convert_zoo.main(["--models", "no_such_model"])
