"""adamjax.convert._losses against keras.losses on the JAX backend (this process's Keras).

Both run op by op on the same float32 arrays, so the contract is bit-identical results: the
same clipping epsilons, the same constants, the same reduction. Inputs include values at and
beyond the clipping bounds (probabilities of exactly 0 and 1, tiny and huge logits), masks and
sample weights, so a different epsilon, clip or divisor shows.
"""

import json

import jax
import keras
import numpy as np
import pytest

from adamjax.convert import ConversionError
from adamjax.convert import _losses as L

RNG = np.random.default_rng(0)
B, C = 6, 5


def _probs(shape):
  p = RNG.random(shape).astype(np.float32)
  p[0, 0] = 0.0  # Clipped to eps.
  p[1, :] = 0.0
  p[1, 1] = 1.0  # Clipped to 1 - eps.
  return p / np.maximum(p.sum(-1, keepdims=True), 1e-30)


LOGITS = (RNG.normal(size=(B, C)) * 4).astype(np.float32)
LOGITS[0, 0] = 40.0  # Saturates softmax and sigmoid.
PROBS = _probs((B, C))
ONE_HOT = np.eye(C, dtype=np.float32)[RNG.integers(0, C, B)]
SPARSE = RNG.integers(0, C, B).astype(np.int32)
BINARY = RNG.integers(0, 2, (B, C)).astype(np.float32)
REG_TRUE = RNG.normal(size=(B, C)).astype(np.float32) * 2
REG_PRED = RNG.normal(size=(B, C)).astype(np.float32) * 2
POSITIVE = np.abs(REG_PRED) + np.float32(0.1)

# (Keras loss object, our Loss, y_true, y_pred)
CASES = {
  "mse": ("mse", REG_TRUE, REG_PRED),
  "mae": ("mae", REG_TRUE, REG_PRED),
  "mape": ("mape", REG_TRUE, REG_PRED),
  "msle": ("msle", REG_TRUE, REG_PRED),
  "cosine": (keras.losses.CosineSimilarity(axis=-1), REG_TRUE, REG_PRED),
  "huber": (keras.losses.Huber(delta=0.7), REG_TRUE, REG_PRED),
  "log_cosh": ("log_cosh", REG_TRUE, REG_PRED),
  "hinge_binary": ("hinge", BINARY, REG_PRED),
  "hinge_signed": ("hinge", 2 * BINARY - 1, REG_PRED),
  "squared_hinge": ("squared_hinge", BINARY, REG_PRED),
  "categorical_hinge": ("categorical_hinge", ONE_HOT, REG_PRED),
  "kld": ("kld", PROBS[::-1].copy(), PROBS),
  "poisson": ("poisson", np.abs(REG_TRUE), POSITIVE),
  "bce_probs": ("binary_crossentropy", BINARY, PROBS),
  "bce_logits": (keras.losses.BinaryCrossentropy(from_logits=True), BINARY, LOGITS),
  "bce_smooth": (keras.losses.BinaryCrossentropy(label_smoothing=0.1), BINARY, PROBS),
  "bfce": (keras.losses.BinaryFocalCrossentropy(gamma=1.5), BINARY, PROBS),
  "bfce_logits_balanced": (
    keras.losses.BinaryFocalCrossentropy(from_logits=True, apply_class_balancing=True, alpha=0.3),
    BINARY,
    LOGITS,
  ),
  "cce_probs": ("categorical_crossentropy", ONE_HOT, PROBS),
  "cce_logits": (keras.losses.CategoricalCrossentropy(from_logits=True), ONE_HOT, LOGITS),
  "cce_smooth": (keras.losses.CategoricalCrossentropy(label_smoothing=0.2), ONE_HOT, PROBS),
  "cfce": (keras.losses.CategoricalFocalCrossentropy(), ONE_HOT, PROBS),
  "cfce_logits": (
    keras.losses.CategoricalFocalCrossentropy(from_logits=True, alpha=0.5, gamma=3.0),
    ONE_HOT,
    LOGITS,
  ),
  "scce_probs": ("sparse_categorical_crossentropy", SPARSE, PROBS),
  "scce_logits": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), SPARSE, LOGITS),
  "scce_column": (
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    SPARSE[:, None],
    LOGITS,
  ),
  "scce_ignore": (
    keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2),
    SPARSE,
    LOGITS,
  ),
  "mse_sum": (keras.losses.MeanSquaredError(reduction="sum"), REG_TRUE, REG_PRED),
  "mse_none": (keras.losses.MeanSquaredError(reduction=None), REG_TRUE, REG_PRED),
  "mae_mean_sw": (
    keras.losses.MeanAbsoluteError(reduction="mean_with_sample_weight"),
    REG_TRUE,
    REG_PRED,
  ),
}


def _ours(keras_loss) -> L.Loss:
  """Our Loss from what Keras would write in compile_config: a name or a serialized class."""
  if isinstance(keras_loss, str):
    return L.get(keras_loss)
  # Through JSON, as it comes out of a .keras file.
  return L.get(json.loads(json.dumps(keras.losses.serialize(keras_loss))))


def _keras(keras_loss, y_true=None, y_pred=None):
  """The loss object Keras's compile() builds from the same identifier, after the trip through
  the saved config that a loaded model makes (``keras.losses.serialize`` then ``get``)."""
  from keras.src.trainers.compile_utils import get_loss

  saved = json.loads(json.dumps(keras.losses.serialize(keras_loss)))
  return get_loss(keras_loss if isinstance(keras_loss, str) else saved, y_true, y_pred)


def _assert_same_bits(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
  np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_is_bit_identical_to_keras_jax(case):
  keras_loss, y_true, y_pred = CASES[case]
  theirs = _keras(keras_loss)
  _assert_same_bits(_ours(keras_loss)(y_true, y_pred), theirs(y_true, y_pred))


@pytest.mark.parametrize("case", ["mse", "cce_logits", "scce_probs", "bce_probs", "huber"])
def test_sample_weight_and_mask_as_keras(case):
  keras_loss, y_true, y_pred = CASES[case]
  theirs = _keras(keras_loss)
  ours = _ours(keras_loss)
  weights = RNG.random(B).astype(np.float32)
  _assert_same_bits(ours(y_true, y_pred, weights), theirs(y_true, y_pred, weights))
  # A Keras mask on y_pred (as a masked sequence output carries) becomes weights total / valid.
  mask = np.array([True, False, True, True, False, True])
  masked = keras.ops.convert_to_tensor(y_pred)
  keras.src.backend.set_keras_mask(masked, mask)
  _assert_same_bits(ours(y_true, y_pred, mask=mask), theirs(y_true, masked))
  _assert_same_bits(ours(y_true, y_pred, weights, mask=mask), theirs(y_true, masked, weights))


def test_huber_delta_is_what_keras_saves():
  # Keras 3's Huber.get_config leaves out delta, so a loaded model trains with delta=1.0 whatever
  # it was compiled with; the converted loss follows the file, as Keras's own reload does.
  saved = json.loads(json.dumps(keras.losses.serialize(keras.losses.Huber(delta=0.7))))
  assert "delta" not in saved["config"]
  assert L.get(saved).kwargs["delta"] == 1.0


def test_the_clipping_matters():
  # Without the 1e-7 clip a zero probability gives an infinite loss: the cases above exercise it.
  loss = L.get("categorical_crossentropy")(ONE_HOT, PROBS)
  assert np.isfinite(loss)
  assert L.EPSILON == keras.backend.epsilon()


def test_reductions():
  values = RNG.random((B, 3)).astype(np.float32)
  from keras.src.losses.loss import reduce_weighted_values

  for reduction in ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"):
    w = RNG.random(B).astype(np.float32)
    _assert_same_bits(
      L.reduce_weighted_values(values, w[:, None], reduction=reduction),
      reduce_weighted_values(values, w[:, None], reduction=reduction),
    )
  with pytest.raises(ValueError, match="reduction must be one of"):
    L.reduce_weighted_values(values, reduction="median")


def test_under_jit_within_a_few_ulps():
  # XLA fuses the jitted version (log_softmax, the mean): a stated bound, not bit identity.
  for case in ("cce_logits", "scce_probs", "bce_logits", "huber", "kld"):
    keras_loss, y_true, y_pred = CASES[case]
    ours = jax.jit(_ours(keras_loss).__call__)(y_true, y_pred)
    theirs = _keras(keras_loss)
    np.testing.assert_allclose(ours, theirs(y_true, y_pred), rtol=4 * 2**-23)


def test_compiled_loss_several_outputs_and_weights():
  config = {
    "loss": ["mse", {"module": "keras.losses", "class_name": "Huber", "config": {}}],
    "loss_weights": [1.0, 0.5],
  }
  loss = L.compiled_loss(config, ["a", "b"])
  got = loss([REG_TRUE, REG_TRUE], [REG_PRED, LOGITS])
  want = keras.losses.get("mse")(REG_TRUE, REG_PRED).mean() + 0.5 * keras.losses.Huber()(
    REG_TRUE, LOGITS
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  by_name = L.compiled_loss({"loss": {"b": "mse"}, "loss_weights": {"b": 2.0}}, ["a", "b"])
  assert by_name.losses[0] is None and by_name.weights == (None, 2.0)
  one = L.compiled_loss({"loss": "ce"}, ["out"], [SPARSE], [LOGITS])
  assert one.losses[0].fn is L.sparse_categorical_crossentropy


def test_crossentropy_shorthand_resolves_as_keras():
  assert L.get("ce", BINARY[:, :1], PROBS[:, :1]).fn is L.binary_crossentropy
  assert L.get("crossentropy", SPARSE, PROBS).fn is L.sparse_categorical_crossentropy
  assert L.get("crossentropy", ONE_HOT, PROBS).fn is L.categorical_crossentropy


def test_refusals_name_the_loss():
  with pytest.raises(ConversionError, match="loss ctc: .*the known losses are"):
    L.get("ctc")
  with pytest.raises(ConversionError, match="MyLoss"):
    L.get({"module": "builtins", "class_name": "MyLoss", "config": {}})
  with pytest.raises(ConversionError, match=r"options \['bogus'\]"):
    L.get({"module": "keras.losses", "class_name": "Huber", "config": {"bogus": 1}})
  with pytest.raises(ConversionError, match="without a loss"):
    L.compiled_loss({"loss": None}, ["out"])
  with pytest.raises(ConversionError, match="2 entries for 3 outputs"):
    L.compiled_loss({"loss": ["mse", "mse"]}, ["a", "b", "c"])
