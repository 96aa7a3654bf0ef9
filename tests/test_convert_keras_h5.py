"""Keras 3 ``.keras``, ``.weights.h5``, ``.weights.json`` and tf-keras ``.h5``: read, write, refuse.

The references are real Keras: ``fixtures_keras.py`` trains each model 3 steps with Keras 3 on
the TensorFlow backend (and tf-keras 2), saves it, and dumps the values of the live variables,
with every Adam slot paired to its variable by Keras's own index (not by file position). Readers
must reproduce those bit for bit. Files we write are loaded back by real Keras (JAX backend in
this process; TensorFlow backend in a subprocess), which must restore every variable bit for bit
and keep training. The malicious files are built here, and each must be refused without running
anything from it.
"""

import base64
import copy
import json
import marshal
import shutil
import zipfile
from pathlib import Path

import h5py
import keras_models
import numpy as np
import pytest
from tf_fixtures_build import build_once, run_tf_backend_script

from adamjax import convert
from adamjax.convert import ConversionError, _keras_h5, _safe_io

FIXTURES = Path(__file__).with_name("fixtures_keras.py")


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
  """Every checkpoint fixtures_keras.py writes (TF backend), built once per test run."""
  return build_once(tmp_path_factory, "keras_fixtures", FIXTURES, "build")


@pytest.fixture
def keras():
  """Keras 3 on the JAX backend (conftest chooses it): the oracle for files we write.

  Keras's own layers broadcast implicitly (a Dense adds a (units,) bias to (batch, units)),
  so the strict rank-promotion rule that guards adamjax's code is relaxed while they run.
  """
  import jax
  import keras

  assert keras.backend.backend() == "jax"
  with jax.numpy_rank_promotion("allow"):
    yield keras


def reference(fixtures: Path, stem: str) -> dict[str, np.ndarray]:
  with np.load(fixtures / f"{stem}.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def keras_config(fixtures: Path, stem: str) -> dict:
  with zipfile.ZipFile(fixtures / f"{stem}.keras") as archive:
    return json.loads(archive.read("config.json"))


def read(fixtures: Path, stem: str, fmt: str, with_config: bool = False):
  config = keras_config(fixtures, stem) if with_config else None
  if fmt == "keras":
    return _keras_h5.read_keras_archive(fixtures / f"{stem}.keras")
  if fmt == "weights.h5":
    return _keras_h5.read_keras_weights_h5(fixtures / f"{stem}.weights.h5", config)
  if fmt == "weights.json":
    return _keras_h5.read_keras_weights_json(fixtures / f"{stem}.weights.json", config)
  assert fmt == "h5"
  return _keras_h5.read_tf_keras_h5(fixtures / f"{stem}.h5")


def assert_same_bits(a, b, what=""):
  a, b = np.asarray(a), np.asarray(b)
  assert (a.dtype, a.shape) == (b.dtype, b.shape), what
  assert a.tobytes() == b.tobytes(), f"{what}: values differ"


def user_key(ckpt, layer_name: str, var: str) -> str:
  """``layer/var`` with Keras's user-facing layer name (how the references are keyed)."""
  layer = ckpt.layer(layer_name)
  return f"{layer.config['name'] if layer.config else layer_name.rsplit('/', 1)[-1]}/{var}"


def assert_matches_keras(ckpt, ref):
  weights = {
    user_key(ckpt, layer.name, var): value
    for layer in ckpt.layers
    for var, value in layer.weights.items()
  }
  assert sorted(weights) == sorted(k[2:] for k in ref if k.startswith("w/"))
  for key, value in weights.items():
    assert_same_bits(value, ref[f"w/{key}"], key)
  # model.trainable_variables order: the order Keras 3 keeps the slots in.
  assert [user_key(ckpt, *k) for k in ckpt.trainable_keys()] == list(ref["trainable"])
  opt = ckpt.optimizer
  # The raw counter Keras stores (opt/0); tf-keras references have no opt/* list.
  assert opt.iterations == int(ref["opt/0"] if "opt/0" in ref else ref["iterations"])
  if "learning_rate" in ref:
    assert_same_bits(np.asarray(opt.learning_rate), ref["learning_rate"], "learning_rate")
  else:
    assert opt.learning_rate is None
  for prefix, slots in (
    ("m/", opt.momentums),
    ("v/", opt.velocities),
    ("vhat/", opt.velocity_hats),
  ):
    got = {user_key(ckpt, *key): value for key, value in slots.items()}
    assert sorted(got) == sorted(k[len(prefix) :] for k in ref if k.startswith(prefix))
    for key, value in got.items():
      assert_same_bits(value, ref[prefix + key], prefix + key)


def assert_same_checkpoint(a, b, *, optimizer_config=True):
  assert [(x.name, x.class_name, x.trainable, list(x.weights)) for x in a.layers] == [
    (x.name, x.class_name, x.trainable, list(x.weights)) for x in b.layers
  ]
  for x, y in zip(a.layers, b.layers, strict=True):
    for var in x.weights:
      assert_same_bits(x.weights[var], y.weights[var], f"{x.name}/{var}")
  oa, ob = a.optimizer, b.optimizer
  assert (oa.iterations, oa.class_name) == (ob.iterations, ob.class_name)
  if optimizer_config:
    assert oa.config == ob.config
  assert (oa.learning_rate is None) == (ob.learning_rate is None)
  if oa.learning_rate is not None:
    assert_same_bits(oa.learning_rate, ob.learning_rate, "learning_rate")
  for name in ("momentums", "velocities", "velocity_hats"):
    sa, sb = getattr(oa, name), getattr(ob, name)
    assert list(sa) == list(sb), name
    for key in sa:
      assert_same_bits(sa[key], sb[key], f"{name}{key}")


# ------------------------------------------------------------------------------------------
# Readers against Keras's own values
# ------------------------------------------------------------------------------------------

READ_CASES = [
  ("mlp", "keras", False),
  ("mlp", "weights.h5", False),
  ("mlp", "weights.json", False),
  ("cnn", "keras", False),
  ("cnn", "weights.h5", True),
  ("cnn", "weights.json", True),
  ("functional", "keras", False),
  ("functional", "weights.h5", True),
  ("mlp_amsgrad", "keras", False),
  ("mlp_schedule", "keras", False),
  ("mlp_schedule", "weights.h5", False),
  ("mlp_adamw", "keras", False),
  ("mlp_ema", "keras", False),
  ("mlp_accum", "keras", False),
  ("tfk_mlp", "h5", False),
  ("tfk_cnn", "h5", False),
  ("tfk_mlp_amsgrad", "h5", False),
  ("tfk_mlp_legacy", "h5", False),
]


@pytest.mark.parametrize(
  "stem,fmt,with_config",
  READ_CASES,
  ids=[f"{s}-{f}{'+config' if c else ''}" for s, f, c in READ_CASES],
)
def test_reader_reproduces_keras_variables_and_slots(fixtures, stem, fmt, with_config):
  ckpt = read(fixtures, stem, fmt, with_config)
  assert_matches_keras(ckpt, reference(fixtures, stem))


def test_frozen_layer_has_no_slots_and_batchnorm_statistics_are_not_trainable(fixtures):
  for ckpt in (read(fixtures, "cnn", "keras"), read(fixtures, "tfk_cnn", "h5")):
    # small_cnn: conv2d, batch_normalization, (frozen) dense, dense_1.
    assert ckpt.layer("dense").trainable == ()
    assert ckpt.layer("batch_normalization").trainable == ("gamma", "beta")
    assert not [k for k in ckpt.optimizer.momentums if k[0] == "dense"]
    assert ("batch_normalization", "moving_mean") not in ckpt.optimizer.velocities
  functional = read(fixtures, "functional", "keras")
  assert [x.name for x in functional.layers] == [
    "conv2d",
    "batch_normalization",
    "sequential/conv2d",
    "dense",
    "dense_1",
  ]
  assert functional.layer("dense").trainable == ()


def test_optimizer_variants_are_recorded(fixtures):
  amsgrad = read(fixtures, "mlp_amsgrad", "keras").optimizer
  assert amsgrad.config["amsgrad"] and len(amsgrad.velocity_hats) == 4
  schedule = read(fixtures, "mlp_schedule", "keras").optimizer
  assert schedule.learning_rate is None
  assert schedule.config["learning_rate"]["class_name"] == "ExponentialDecay"
  adamw = read(fixtures, "mlp_adamw", "keras").optimizer
  assert adamw.class_name == "AdamW" and adamw.config["weight_decay"] == pytest.approx(0.004)
  ema = read(fixtures, "mlp_ema", "keras")
  assert ema.optimizer.config["use_ema"] and any("use_ema" in n for n in ema.notes)
  accum = read(fixtures, "mlp_accum", "keras")
  # The raw micro-batch counter; Keras's optimizer.iterations is it // steps.
  assert accum.optimizer.iterations // 2 == int(reference(fixtures, "mlp_accum")["iterations"])
  legacy = read(fixtures, "tfk_mlp_legacy", "h5").optimizer
  assert legacy.class_name == "Adam" and "decay" not in legacy.config


@pytest.mark.parametrize("stem", ["mlp", "cnn"])
def test_keras_weights_h5_and_sharded_json_give_the_same_checkpoint(fixtures, stem):
  archive = read(fixtures, stem, "keras")
  for fmt in ("weights.h5", "weights.json"):
    assert_same_checkpoint(archive, read(fixtures, stem, fmt, with_config=True))
  assert len(list(fixtures.glob(f"{stem}_0000*.weights.h5"))) >= 3  # really sharded
  if stem == "mlp":  # without a config: the same arrays; the optimizer's config is unknown
    for fmt in ("weights.h5", "weights.json"):
      assert_same_checkpoint(archive, read(fixtures, stem, fmt), optimizer_config=False)


def test_bare_weights_with_a_frozen_layer_ask_for_the_config(fixtures):
  with pytest.raises(ConversionError, match="frozen layers.*pass model_config"):
    read(fixtures, "cnn", "weights.h5")


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------

ROUND_TRIPS = ["mlp", "cnn", "functional", "mlp_amsgrad", "mlp_schedule", "mlp_adamw"]


@pytest.mark.parametrize("stem", ROUND_TRIPS)
def test_read_write_read_is_bit_identical(fixtures, tmp_path, stem):
  ckpt = read(fixtures, stem, "keras")
  _keras_h5.write_keras_weights_h5(ckpt, tmp_path / "w.weights.h5")
  _keras_h5.write_keras_archive(ckpt, tmp_path / "m.keras")
  again = _keras_h5.read_keras_archive(tmp_path / "m.keras")
  assert_same_checkpoint(ckpt, again)
  assert again.model_config == ckpt.model_config
  assert_same_checkpoint(
    ckpt, _keras_h5.read_keras_weights_h5(tmp_path / "w.weights.h5", ckpt.model_config)
  )
  with zipfile.ZipFile(tmp_path / "m.keras") as archive:
    assert [i.filename for i in archive.infolist()] == [
      "metadata.json",
      "config.json",
      "model.weights.h5",
    ]
    assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    assert set(json.loads(archive.read("metadata.json"))) == {"keras_version", "date_saved"}


@pytest.mark.parametrize("stem", ["mlp", "mlp_schedule"])
def test_bare_weights_round_trip_without_a_config(fixtures, tmp_path, stem):
  ckpt = read(fixtures, stem, "weights.h5")
  _keras_h5.write_keras_weights_h5(ckpt, tmp_path / "w.weights.h5")
  assert_same_checkpoint(ckpt, _keras_h5.read_keras_weights_h5(tmp_path / "w.weights.h5"))


def test_tf_keras_checkpoint_writes_as_keras3_weights(fixtures, tmp_path):
  ckpt = read(fixtures, "tfk_cnn", "h5")
  _keras_h5.write_keras_weights_h5(ckpt, tmp_path / "w.weights.h5")
  # tf-keras keeps no learning-rate variable in .h5; the converter writes training_config's.
  again = _keras_h5.read_keras_weights_h5(tmp_path / "w.weights.h5", keras_config(fixtures, "cnn"))
  assert_same_checkpoint(ckpt, again, optimizer_config=False)
  with pytest.raises(ConversionError, match="not a Keras 3 config"):
    _keras_h5.write_keras_archive(ckpt, tmp_path / "m.keras")


@pytest.mark.parametrize("stem", ["mlp", "cnn", "functional"])
def test_written_weights_h5_has_keras_own_layout(fixtures, tmp_path, stem):
  """Same groups in the same order, same ``name`` attributes and datasets as save_weights."""
  from adamjax.convert._safe_io import open_h5

  ckpt = read(fixtures, stem, "keras")
  _keras_h5.write_keras_weights_h5(ckpt, tmp_path / "w.weights.h5")
  theirs, ours = fixtures / f"{stem}.weights.h5", tmp_path / "w.weights.h5"
  with open_h5(theirs, "keras") as k, open_h5(ours, "ours") as o:
    assert o.groups == k.groups
    assert list(o.datasets) == list(k.datasets)
    for group in k.groups:
      assert o.attr_string(group, "name") == k.attr_string(group, "name"), group
    for path in k.datasets:
      assert_same_bits(o.read(path), k.read(path), path)


def _assert_keras_restored(model, ref):
  for var in model.weights:
    key = "/".join(var.path.split("/")[-2:])
    assert_same_bits(np.asarray(var.value), ref[f"w/{key}"], key)
  variables = model.optimizer.variables
  assert len(variables) == len([k for k in ref if k.startswith("opt/")])
  # Keras on JAX keeps `iteration` as int32 (x64 is off); its value must match.
  assert int(variables[0].value) == int(ref["opt/0"])
  for i, var in enumerate(variables[1:], start=1):
    assert_same_bits(np.asarray(var.value), ref[f"opt/{i}"], var.path)


@pytest.mark.parametrize("stem", ["cnn", "functional", "mlp_amsgrad", "mlp_schedule"])
def test_keras_loads_written_archive_and_continues_training(fixtures, tmp_path, keras, stem):
  ckpt = read(fixtures, stem, "keras")
  _keras_h5.write_keras_archive(ckpt, tmp_path / "m.keras")
  model = keras.saving.load_model(tmp_path / "m.keras")
  _assert_keras_restored(model, reference(fixtures, stem))
  assert int(model.optimizer.iterations) == 3
  if stem == "mlp_amsgrad":  # one more fit step (the CNN's: test_tensorflow_keras_...)
    x, y = keras_models.batches(1, seed=1)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 4
    assert all(np.isfinite(np.asarray(v.value)).all() for v in model.trainable_variables)


def test_keras_loads_written_weights_h5_into_a_built_optimizer(fixtures, tmp_path, keras):
  _keras_h5.write_keras_weights_h5(read(fixtures, "cnn", "keras"), tmp_path / "w.weights.h5")
  # Fresh layer names (batch_normalization, not _2): other tests in this process built layers.
  keras.utils.clear_session()
  model = keras_models.small_cnn(keras)
  # Without build, Keras skips optimizer state with only a warning (Keras's own gotcha).
  model.optimizer.build(model.trainable_variables)
  model.load_weights(tmp_path / "w.weights.h5")
  _assert_keras_restored(model, reference(fixtures, "cnn"))


def test_tensorflow_keras_loads_written_archive(fixtures, tmp_path):
  _keras_h5.write_keras_archive(read(fixtures, "cnn", "keras"), tmp_path / "m.keras")
  run_tf_backend_script(FIXTURES, "load", str(tmp_path / "m.keras"), str(tmp_path / "restored.npz"))
  restored, ref = reference(tmp_path, "restored"), reference(fixtures, "cnn")
  for key in [k for k in ref if k.startswith(("w/", "opt/", "m/", "v/"))] + ["iterations"]:
    assert_same_bits(restored[key], ref[key], key)
  assert int(restored["iterations_after_fit"]) == 4


def test_writers_refuse_what_keras_would_load_wrongly(fixtures, tmp_path):
  ckpt = read(fixtures, "mlp", "weights.h5")  # no config
  with pytest.raises(ConversionError, match="needs the model's Keras config"):
    _keras_h5.write_keras_archive(ckpt, tmp_path / "m.keras")
  ema = read(fixtures, "mlp_ema", "keras")
  with pytest.raises(ConversionError, match="use_ema"):
    _keras_h5.write_keras_weights_h5(ema, tmp_path / "ema.weights.h5")
  assert not (tmp_path / "ema.weights.h5").exists()
  assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer cleaned up
  broken = read(fixtures, "mlp", "keras")
  del broken.optimizer.velocities[("dense_1", "bias")]
  with pytest.raises(ConversionError, match="no velocity slot for dense_1/bias"):
    _keras_h5.write_keras_archive(broken, tmp_path / "m.keras")


# ------------------------------------------------------------------------------------------
# Refusals: nothing from an untrusted file runs
# ------------------------------------------------------------------------------------------


def write_archive(path: Path, config, weights: bytes, extra: dict[str, bytes] | None = None):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
    archive.writestr("config.json", json.dumps(config))
    archive.writestr("model.weights.h5", weights)
    for name, data in (extra or {}).items():
      archive.writestr(name, data)
  return path


def _insert_layer(entry):
  return lambda config: config["config"]["layers"].insert(2, entry)


def _set_on_dense(key, value):
  return lambda config: config["config"]["layers"][2]["config"].__setitem__(key, value)


def _set_dense_entry(key, value):
  return lambda config: config["config"]["layers"][2].__setitem__(key, value)


MALICIOUS_CONFIGS = {
  "module-os": (
    _insert_layer(
      {
        "module": "os",
        "class_name": "system",
        "config": {"command": "touch MARKER"},
        "registered_name": None,
      }
    ),
    r"\$\.config\.layers\[2\].*module 'os' is outside Keras",
  ),
  "builtins-function": (
    _set_on_dense(
      "activation",
      {
        "module": "builtins",
        "class_name": "function",
        "config": "exec",
        "registered_name": "function",
      },
    ),
    r"layers\[2\]\.config\.activation.*Python function",
  ),
  "tfsmlayer": (
    _insert_layer(
      {
        "module": "keras.layers",
        "class_name": "TFSMLayer",
        "config": {"name": "tfsm", "filepath": "/tmp/attacker_model", "call_endpoint": "serve"},
        "registered_name": None,
      }
    ),
    "TFSMLayer loads and runs",
  ),
  "stringlookup-file": (
    _insert_layer(
      {
        "module": "keras.layers",
        "class_name": "StringLookup",
        "config": {"name": "lookup", "vocabulary": "/etc/passwd"},
        "registered_name": None,
      }
    ),
    "vocabulary files",
  ),
  "registered-custom": (
    _set_dense_entry("registered_name", "MyPackage>EvilDense"),
    "registered_name 'MyPackage>EvilDense'",
  ),
  "keras-lookalike-module": (_set_dense_entry("module", "keras_evil.layers"), "outside Keras"),
  "unknown-activation": (
    _set_on_dense("activation", "my_activation"),
    "activation 'my_activation'",
  ),
  "quantized": (_set_on_dense("quantization_config", {"mode": "int8"}), "quantized"),
  "lora": (_set_on_dense("lora_rank", 4), "LoRA"),
  "torch-module": (
    _insert_layer(
      {
        "module": "keras.layers",
        "class_name": "TorchModuleWrapper",
        "config": {"name": "t", "module": "gASV..."},
        "registered_name": None,
      }
    ),
    "pickled PyTorch module",
  ),
  "unlisted-layer": (
    _insert_layer(
      {
        "module": "keras.layers",
        "class_name": "ConvLSTM2D",
        "config": {"name": "conv_lstm2d"},
        "registered_name": None,
      }
    ),
    "not on the converter's allow-list",
  ),
}


@pytest.mark.parametrize("name", list(MALICIOUS_CONFIGS))
def test_archive_with_unsafe_config_is_refused(fixtures, tmp_path, name):
  mutate, message = MALICIOUS_CONFIGS[name]
  config = copy.deepcopy(keras_config(fixtures, "mlp"))
  mutate(config)
  weights = zipfile.ZipFile(fixtures / "mlp.keras").read("model.weights.h5")
  path = write_archive(tmp_path / "evil.keras", config, weights)
  with pytest.raises(ConversionError, match=message):
    _keras_h5.read_keras_archive(path)
  # The same config handed to the weights reader is checked the same way.
  with pytest.raises(ConversionError, match=message):
    _keras_h5.read_keras_weights_h5(fixtures / "mlp.weights.h5", config)


def _marker_lambda(marker: Path):
  # The path is a constant inside the code object, so the bytecode alone creates the file.
  return eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")


def test_archive_with_lambda_is_refused_and_nothing_runs(tmp_path, keras):
  marker = tmp_path / "lambda_ran"
  model = keras.Sequential(
    [keras.Input((4,)), keras.layers.Lambda(_marker_lambda(marker)), keras.layers.Dense(2)]
  )
  model.save(tmp_path / "lambda.keras")  # real Keras writes the bytecode into config.json
  marker.unlink()  # building the model called the lambda once
  with pytest.raises(ConversionError, match=r"layers\[1\].*Lambda layer carries Python"):
    _keras_h5.read_keras_archive(tmp_path / "lambda.keras")
  assert not marker.exists()
  # Control: the payload is live; Keras with safe_mode off does run it.
  keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=False)
  assert marker.exists()


def test_tf_keras_h5_with_lambda_is_refused_and_nothing_runs(fixtures, tmp_path):
  marker = tmp_path / "lambda_ran"
  code = base64.b64encode(marshal.dumps(_marker_lambda(marker).__code__)).decode()
  path = Path(shutil.copy(fixtures / "tfk_mlp.h5", tmp_path / "evil.h5"))
  with h5py.File(path, "a") as f:
    config = json.loads(f.attrs["model_config"])
    # tf-keras's Lambda config: ``function`` is (base64 marshal bytecode, defaults, closure).
    config["config"]["layers"].insert(
      2,
      {
        "class_name": "Lambda",
        "config": {
          "name": "lambda",
          "trainable": True,
          "dtype": "float32",
          "function": [code, None, None],
          "function_type": "lambda",
          "module": "__main__",
          "output_shape": None,
          "output_shape_type": "raw",
          "arguments": {},
        },
      },
    )
    f.attrs["model_config"] = json.dumps(config)
  with pytest.raises(ConversionError, match=r"model_config.*layers\[2\].*Lambda"):
    _keras_h5.read_tf_keras_h5(path)
  assert not marker.exists()


def test_tf_keras_legacy_adam_with_decay_is_refused(fixtures, tmp_path):
  path = Path(shutil.copy(fixtures / "tfk_mlp_legacy.h5", tmp_path / "decay.h5"))
  with h5py.File(path, "a") as f:
    training = json.loads(f.attrs["training_config"])
    training["optimizer_config"]["config"]["decay"] = 0.01
    f.attrs["training_config"] = json.dumps(training)
  with pytest.raises(ConversionError, match=r"decay=0\.01.*lr / \(1 \+ decay"):
    _keras_h5.read_tf_keras_h5(path)


@pytest.mark.parametrize(
  "member", ["../evil.py", "/etc/evil", "assets/../../evil", "C:/evil", "evil.py"]
)
def test_archive_with_unsafe_member_name_is_refused(fixtures, tmp_path, member):
  with zipfile.ZipFile(fixtures / "mlp.keras") as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  path = tmp_path / "evil.keras"
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
    archive.writestr(zipfile.ZipInfo(member), b"print('pwned')")
  assert member in zipfile.ZipFile(path).namelist()  # zipfile keeps the name as written
  with pytest.raises(ConversionError, match="zip member"):
    _keras_h5.read_keras_archive(path)
  assert not (tmp_path.parent / "evil.py").exists()


def test_archive_with_oversize_member_is_refused_before_reading(fixtures, tmp_path):
  path = Path(shutil.copy(fixtures / "mlp.keras", tmp_path / "big.keras"))
  data = bytearray(path.read_bytes())
  # Declare ~4 GiB for model.weights.h5 in the central directory (uncompressed size at
  # offset 24 of its entry); nothing that large is ever allocated.
  entry = data.index(b"PK\x01\x02")
  while not data[entry + 46 :].startswith(b"model.weights.h5"):
    entry = data.index(b"PK\x01\x02", entry + 4)
  data[entry + 24 : entry + 28] = (0xFFFFFFF0).to_bytes(4, "little")
  path.write_bytes(bytes(data))
  assert zipfile.ZipFile(path).getinfo("model.weights.h5").file_size == 0xFFFFFFF0
  with pytest.raises(ConversionError, match="declare more than max_bytes|a zip bomb"):
    _keras_h5.read_keras_archive(path, max_bytes=1 << 30)


def _add_object(kind: str, f, tmp_path: Path) -> None:
  group = f["layers/dense/vars"]
  if kind == "object-dtype":
    group.create_dataset("2", shape=(1,), dtype=h5py.ref_dtype)
  elif kind == "vlen-string":
    group.create_dataset("2", data=["x"], dtype=h5py.string_dtype())
  elif kind == "external-link":
    with h5py.File(tmp_path / "other.h5", "w") as other:
      other["x"] = np.zeros(3, np.float32)
    group["2"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
  elif kind == "soft-link":
    group["2"] = h5py.SoftLink("/layers/dense/vars/0")
  elif kind == "hard-link-alias":
    group["2"] = f["layers/dense/vars/0"]
  elif kind == "virtual":
    layout = h5py.VirtualLayout(shape=(3,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=(3,))
    group.create_virtual_dataset("2", layout)
  elif kind == "external-storage":
    (tmp_path / "raw.bin").write_bytes(bytes(16))
    group.create_dataset("2", shape=(4,), dtype="f4", external=[(str(tmp_path / "raw.bin"), 0, 16)])
  elif kind == "shape-bomb":
    # Declares 32 GiB, stores nothing (compressed chunks of fill value).
    group.create_dataset(
      "2", shape=(1 << 17, 1 << 16), dtype="f4", chunks=(64, 64), compression="gzip"
    )


MALICIOUS_H5 = {
  "object-dtype": "not a plain number type",
  "vlen-string": "not a plain number type",
  "external-link": "external link",
  "soft-link": "soft link",
  "hard-link-alias": "several paths",
  "virtual": "virtual dataset",
  "external-storage": "stored in external files",
  "shape-bomb": "declares",
}


@pytest.mark.parametrize("container", ["weights.h5", "keras"])
@pytest.mark.parametrize("kind", list(MALICIOUS_H5))
def test_h5_with_unsafe_object_is_refused(fixtures, tmp_path, kind, container):
  path = Path(shutil.copy(fixtures / "mlp.weights.h5", tmp_path / "evil.weights.h5"))
  with h5py.File(path, "a") as f:
    _add_object(kind, f, tmp_path)
  # (An alias is reported at whichever of its two paths the walk meets first.)
  match = rf"/layers/dense/vars/[02]: .*{MALICIOUS_H5[kind]}"
  if container == "keras":
    path = write_archive(tmp_path / "evil.keras", keras_config(fixtures, "mlp"), path.read_bytes())
    with pytest.raises(ConversionError, match=match):
      _keras_h5.read_keras_archive(path)
  else:
    with pytest.raises(ConversionError, match=match):
      _keras_h5.read_keras_weights_h5(path)


def test_sharded_index_pointing_outside_its_folder_is_refused(fixtures, tmp_path):
  index = json.loads((fixtures / "mlp.weights.json").read_text())
  index["weight_map"]["/layers/dense/vars"] = ["../../etc/shadow.h5"]
  path = tmp_path / "evil.weights.json"
  path.write_text(json.dumps(index))
  with pytest.raises(ConversionError, match="refusing shard name '../../etc/shadow.h5'"):
    _keras_h5.read_keras_weights_json(path)


# ------------------------------------------------------------------------------------------
# Damaged files: one short ConversionError, bounded memory, info checks what to-jax needs
# ------------------------------------------------------------------------------------------


def test_deflated_member_over_the_ratio_is_refused_before_inflating(fixtures, tmp_path):
  path = tmp_path / "bomb.keras"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("config.json", json.dumps(keras_config(fixtures, "mlp")))
    archive.writestr("model.weights.h5", b"\0" * (64 << 20))  # 64 MiB in about 64 kB.
  with pytest.raises(ConversionError, match="a zip bomb"):
    _keras_h5.read_keras_archive(path)


def test_compressed_dataset_is_not_read_before_the_layout_is_checked(
  fixtures, tmp_path, monkeypatch
):
  """A 1 GiB gzip dataset that stores 1/64 of that (inside the 1000x ratio cap) in the place of
  a slot whose shape the variables fix: refused from declared shapes, nothing large read."""
  path = Path(shutil.copy(fixtures / "mlp.weights.h5", tmp_path / "w.weights.h5"))
  with h5py.File(path, "r+") as f:
    del f["optimizer/vars/2"]
    ds = f.create_dataset(
      "optimizer/vars/2", (1 << 12, 1 << 16), "f4", chunks=(1, 1 << 16), compression="gzip"
    )
    noise = np.random.default_rng(0).random((1, 1 << 16), "f4")
    for row in range(0, 1 << 12, 64):
      ds[row : row + 1] = noise
  reads = []
  read = _safe_io.SafeH5.read
  monkeypatch.setattr(_safe_io.SafeH5, "read", lambda self, p: reads.append(p) or read(self, p))
  with pytest.raises(ConversionError, match=r"optimizer/vars/2 should be the momentum"):
    _keras_h5.read_keras_weights_h5(path)
  with h5py.File(path) as f:  # Only the tiny datasets (scalars, a 10-element bias) were read.
    assert reads and all(f[p].size <= 16 for p in reads), reads


def test_big_endian_datasets_are_read_in_native_order(fixtures, tmp_path):
  path = Path(shutil.copy(fixtures / "mlp.weights.h5", tmp_path / "w.weights.h5"))
  with h5py.File(path, "r+") as f:
    kernel = f["layers/dense/vars/0"][()]
    del f["layers/dense/vars/0"]
    f["layers/dense/vars/0"] = kernel.astype(">f4")
  value = _keras_h5.read_keras_weights_h5(path).layer("dense").weights["kernel"]
  assert value.dtype == np.dtype("float32") and value.dtype.isnative
  assert_same_bits(value, kernel)


def _archive_with(fixtures, tmp_path, edit) -> Path:
  config = copy.deepcopy(keras_config(fixtures, "mlp"))
  edit(config)
  weights = zipfile.ZipFile(fixtures / "mlp.keras").read("model.weights.h5")
  return write_archive(tmp_path / "edited.keras", config, weights)


def _set_optimizer(key, value):
  return lambda config: config["compile_config"]["optimizer"]["config"].__setitem__(key, value)


@pytest.mark.parametrize(
  ("key", "value"),
  [("epsilon", "1e-7"), ("beta_1", float("inf")), ("beta_2", 1.0), ("learning_rate", -0.1)],
)
def test_info_refuses_optimizer_settings_to_jax_cannot_use(fixtures, tmp_path, key, value):
  from adamjax.convert import __main__ as cli
  from adamjax.convert import _orbax

  path = _archive_with(fixtures, tmp_path, _set_optimizer(key, value))
  with pytest.raises(ConversionError, match=f"optimizer setting {key}"):
    _orbax.converted_tree(convert.read(path))
  assert cli.main(["info", str(path)]) == 2


def test_empty_arrays_are_refused_before_orbax(fixtures):
  from adamjax.convert import _orbax

  ckpt = convert.read(fixtures / "mlp.keras")
  ckpt.layers[0].weights["bias"] = np.zeros((0,), "f4")
  with pytest.raises(ConversionError, match="'dense/bias' is empty"):
    _orbax.converted_tree(ckpt)


def test_hostile_strings_are_clipped_and_the_cli_prints_one_line(fixtures, tmp_path, capsys):
  """An 8 MB layer name (with a newline and a lone surrogate) is not echoed in full."""
  from adamjax.convert import __main__ as cli

  name = "evil\n\udcff" + "A" * (8 << 20)
  path = _archive_with(fixtures, tmp_path, _set_on_dense("name", name))
  with pytest.raises(ConversionError) as info:
    convert.read(path)
  message = str(info.value)
  assert str(path) in message and len(message) <= 1500
  message.encode("utf-8")  # Printable: the surrogate is escaped.
  assert cli.main(["info", str(path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 2100
