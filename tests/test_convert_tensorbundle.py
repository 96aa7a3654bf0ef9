"""TensorFlow-format checkpoints read without TensorFlow, checked against TensorFlow and Keras.

The fixtures come from ``fixtures_tf.py``, run once per session in a TensorFlow-backend
subprocess: it trains each model 3 steps, writes every format, and records two oracles beside
the files: ``tf.train.load_checkpoint`` of every bundle, and Keras's variables and Adam slots
read from the live objects. This process never imports TensorFlow.

- Conformance: ``read_bundle`` returns what TensorFlow's reader returns, bit for bit, on every
  bundle (single file, sharded and sliced, SavedModel variables, tf-keras, legacy slots).
- Semantics: each reader yields Keras's own weights and slots, tied to the right variables.
- Security: hostile bundles (patched copies of real ones) are refused with a message naming the
  file, the entry and the problem.
"""

import dataclasses
import json
import pathlib
import shutil
import struct
import subprocess
import sys

import convert_fuzz
import numpy as np
import pytest
from tf_fixtures_build import build_once

from adamjax.convert import _tensorbundle, _tf_checkpoint, _tf_graph, _tf_optimizer, _wire
from adamjax.convert._ir import ConversionError

HERE = pathlib.Path(__file__).parent
BUNDLES = [
  "mlp.ckpt",
  "mlp.sharded",
  "mlp.export",
  "mlp.savedmodel",
  "cnn.ckpt",
  "cnn.sharded",
  "cnn.export",
  "cnn.savedmodel",
  "mlp_amsgrad.ckpt",
  "mlp_lossscale.ckpt",
  "mlp_rmsprop.ckpt",
  "tfk_mlp.ckpt",
  "tfk_cnn.ckpt",
  "tfk_mlp_legacy.ckpt",
  "tfk_cnn_legacy.ckpt",
  "tfk_mlp_decay.ckpt",
  "tfk_twins.ckpt",
  "tfk_cnn.savedmodel",
]


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> pathlib.Path:
  """The checkpoints of ``fixtures_tf.py``, built once per test run."""
  return build_once(tmp_path_factory, "tf_fixtures", HERE / "fixtures_tf.py")


def _manifest(fixtures: pathlib.Path) -> dict[str, str]:
  return json.loads((fixtures / "manifest.json").read_text())


def _reference(fixtures: pathlib.Path, stem: str) -> dict[str, np.ndarray]:
  with np.load(fixtures / f"{stem}.npz", allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------------------------
# Conformance with tf.train.load_checkpoint
# --------------------------------------------------------------------------------------------


def test_fixture_writes_every_bundle(fixtures):
  assert sorted(_manifest(fixtures)) == sorted(BUNDLES)


@pytest.mark.parametrize("name", BUNDLES)
def test_read_bundle_is_bit_identical_to_tensorflow(fixtures, name):
  prefix = fixtures / _manifest(fixtures)[name]
  ours = _tensorbundle.read_bundle(prefix)
  with np.load(fixtures / "dumps" / f"{name}.npz", allow_pickle=False) as dump:
    keys = dump["keys"].tolist()
    assert sorted(ours) == keys
    for i, (key, dtype) in enumerate(zip(keys, dump["dtypes"].tolist(), strict=True)):
      value = ours[key]
      if dtype == "string":
        lengths, shape = dump[f"l{i}"], tuple(dump[f"s{i}"])
        assert value.dtype == object and value.shape == shape, key
        assert [len(b) for b in value.reshape(-1)] == lengths.tolist(), key
        assert b"".join(value.reshape(-1)) == dump[f"t{i}"].tobytes(), key
      else:
        expected = dump[f"t{i}"]
        assert value.dtype == expected.dtype and value.dtype.name == dtype, key
        assert value.shape == expected.shape, key
        assert value.tobytes() == expected.tobytes(), key


def test_sharded_fixture_really_has_shards_and_slices(fixtures):
  for name in ("mlp.sharded", "cnn.sharded"):
    reader = _tensorbundle.BundleReader(fixtures / _manifest(fixtures)[name])
    keys = reader.keys()
    sliced = [k for k in keys if reader.entry(k).slices]
    assert reader.header.num_shards > 1, name
    assert sliced and max(len(reader.entry(k).slices) for k in sliced) > 1, name


def test_crc32c_known_answers():
  # RFC 3720 (iSCSI) B.4 test vectors; the long input takes the numpy path.
  assert _wire.crc32c(b"123456789") == 0xE3069283
  assert _wire.crc32c(bytes(32)) == 0x8A9136AA
  assert _wire.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert _wire.crc32c(bytes(range(32))) == 0x46DD794E
  data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
  assert _wire.crc32c(data) == _wire.crc32c(data[50_000:], _wire.crc32c(data[:50_000]))


# --------------------------------------------------------------------------------------------
# The readers against Keras's own variables
# --------------------------------------------------------------------------------------------


def _assert_weights(ckpt, ref):
  """Every Keras variable, bit for bit, under Keras's name; trainable in Keras's order."""
  assert [layer.name for layer in ckpt.layers] == ref["layers"].tolist()
  expected = {k[2:]: v for k, v in ref.items() if k.startswith("w/")}
  expected = {k: v for k, v in expected.items() if not k.endswith("seed_generator_state")}
  got = {f"{layer.name}/{v}": w for layer in ckpt.layers for v, w in layer.weights.items()}
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    assert got[key].tobytes() == value.tobytes(), key
  assert [f"{layer}/{v}" for layer, v in ckpt.trainable_keys()] == ref["trainable"].tolist()


def _assert_adam(ckpt, ref):
  opt = ckpt.optimizer
  assert opt is not None and opt.class_name == "Adam"
  assert opt.iterations == int(ref["iterations"]) == 3
  assert opt.learning_rate == ref["learning_rate"] and opt.learning_rate.dtype == np.float32
  for kind, slots in (("m", opt.momentums), ("v", opt.velocities), ("vhat", opt.velocity_hats)):
    expected = {k[len(kind) + 1 :]: v for k, v in ref.items() if k.startswith(kind + "/")}
    assert sorted(f"{layer}/{v}" for layer, v in slots) == sorted(expected), kind
    for (layer, var), value in slots.items():
      assert value.tobytes() == expected[f"{layer}/{var}"].tobytes(), (kind, layer, var)
      assert value.dtype == expected[f"{layer}/{var}"].dtype


TF_CHECKPOINTS = [
  ("mlp", "mlp.ckpt"),  # The directory: its `checkpoint` file names ckpt-1.
  ("cnn", "cnn.ckpt"),  # CheckpointManager directory: ckpt-2 is the latest.
  ("mlp", "mlp.sharded/ckpt"),  # A prefix; 31 shards, sliced kernel.
  ("cnn", "cnn.sharded/ckpt"),
  ("mlp_amsgrad", "mlp_amsgrad.ckpt"),
  ("tfk_mlp", "tfk_mlp.ckpt/ckpt"),
  ("tfk_cnn", "tfk_cnn.ckpt/ckpt.index"),
  ("tfk_mlp_legacy", "tfk_mlp_legacy.ckpt"),
  ("tfk_cnn_legacy", "tfk_cnn_legacy.ckpt"),
  # Two (16, 16) Dense layers, the first frozen: shapes fit either, slot names decide.
  ("tfk_twins", "tfk_twins.ckpt"),
]


@pytest.mark.parametrize("stem,path", TF_CHECKPOINTS)
def test_read_tf_checkpoint_matches_keras(fixtures, stem, path):
  ckpt = _tf_checkpoint.read_tf_checkpoint(fixtures / path)
  ref = _reference(fixtures, stem)
  assert ckpt.format == "tf-checkpoint"
  _assert_weights(ckpt, ref)
  _assert_adam(ckpt, ref)
  assert ckpt.optimizer.config["amsgrad"] == ("amsgrad" in stem)
  if "legacy" in stem:  # Legacy Adam stores its betas as variables.
    assert ckpt.optimizer.config["beta_1"] == ref["beta_1"]
    assert ckpt.optimizer.config["beta_2"] == ref["beta_2"]
  assert any("class-based" in note for note in ckpt.notes)


@pytest.mark.parametrize("stem", ["mlp", "cnn", "tfk_cnn"])
def test_read_savedmodel_of_tf_saved_model_save_keeps_adam(fixtures, stem):
  ckpt = _tf_checkpoint.read_savedmodel(fixtures / f"{stem}.savedmodel")
  ref = _reference(fixtures, stem)
  assert ckpt.format == "savedmodel"
  _assert_weights(ckpt, ref)
  _assert_adam(ckpt, ref)


@pytest.mark.parametrize("stem", ["mlp", "cnn"])
def test_read_savedmodel_of_export_is_weights_only(fixtures, stem):
  ckpt = _tf_checkpoint.read_savedmodel(fixtures / f"{stem}.export")
  _assert_weights(ckpt, _reference(fixtures, stem))
  assert ckpt.optimizer is None
  assert any("no optimizer state" in note for note in ckpt.notes)


@pytest.mark.parametrize("stem", ["mlp", "cnn", "mlp_amsgrad"])
def test_read_orbax_callback_matches_keras(fixtures, stem):
  ckpt = _tf_checkpoint.read_orbax_callback(fixtures / f"{stem}.orbax")
  ref = _reference(fixtures, stem)
  assert ckpt.format == "orbax-callback"
  _assert_weights(ckpt, ref)
  _assert_adam(ckpt, ref)
  assert ckpt.optimizer.config["amsgrad"] == (stem == "mlp_amsgrad")
  assert ckpt.model_config["class_name"] == "Sequential"
  # The step directory itself reads the same.
  again = _tf_checkpoint.read_orbax_callback(fixtures / f"{stem}.orbax" / "0")
  assert again.optimizer.iterations == ckpt.optimizer.iterations


@pytest.mark.parametrize(
  "reader,path",
  [
    (_tf_checkpoint.read_tf_checkpoint, "cnn.ckpt"),
    (_tf_checkpoint.read_tf_checkpoint, "tfk_cnn.ckpt"),
    (_tf_checkpoint.read_tf_checkpoint, "tfk_cnn_legacy.ckpt"),
    (_tf_checkpoint.read_savedmodel, "cnn.savedmodel"),
    (_tf_checkpoint.read_savedmodel, "cnn.export"),
    (_tf_checkpoint.read_savedmodel, "tfk_cnn.savedmodel"),
    (_tf_checkpoint.read_orbax_callback, "cnn.orbax"),
  ],
)
def test_frozen_layer_and_batchnorm_statistics_are_not_trainable(fixtures, reader, path):
  ckpt = reader(fixtures / path)
  assert [layer.class_name for layer in ckpt.layers] == [
    "Conv2D",
    "BatchNormalization",
    "Dense",
    "Dense",
  ]
  assert ckpt.layer("batch_normalization").trainable == ("gamma", "beta")
  assert ckpt.layer("dense").trainable == ()  # The frozen Dense(32).
  if ckpt.optimizer is not None:
    for slots in (ckpt.optimizer.momentums, ckpt.optimizer.velocities):
      assert not [k for k in slots if k[0] == "dense" or k[1].startswith("moving_")]


def test_tf_keras_slots_without_names_are_ambiguous_and_refused(fixtures):
  # tfk_twins read above only because the slot names settle which (16, 16) layer is frozen;
  # with the names blanked out, shapes alone fit two choices, and the reader must not guess.
  graph = _tf_graph.Graph.open(str(fixtures / "tfk_twins.ckpt" / "ckpt"))
  graph.nodes = [
    dataclasses.replace(node, attributes=tuple((name, "", key) for name, _, key in node.attributes))
    for node in graph.nodes
  ]
  model = graph.child(0, "model")
  with pytest.raises(ConversionError, match="cannot tell which layers"):
    _tf_optimizer.adam_slots(
      graph, graph.child(0, "optimizer"), _tf_graph.model_layers(graph, model)
    )


def test_untrained_checkpoint_has_no_adam_state(fixtures):
  # ckpt-1 of the CheckpointManager was saved before the optimizer was built.
  ckpt = _tf_checkpoint.read_tf_checkpoint(fixtures / "cnn.ckpt" / "ckpt-1")
  assert ckpt.optimizer is None
  assert any("not been built" in note for note in ckpt.notes)


@pytest.mark.parametrize(
  "path,message",
  [
    ("mlp_lossscale.ckpt", "LossScaleOptimizer"),
    ("mlp_rmsprop.ckpt", "state Adam does not"),
    ("tfk_mlp_decay.ckpt", "decay=0.001"),
  ],
)
def test_refuses_what_is_not_plain_adam(fixtures, path, message):
  with pytest.raises(ConversionError, match=message) as info:
    _tf_checkpoint.read_tf_checkpoint(fixtures / path)
  assert path in str(info.value)


def test_checkpoint_file_may_not_point_outside_its_directory(fixtures, tmp_path):
  shutil.copytree(fixtures / "mlp.ckpt", tmp_path / "ckpt")
  (tmp_path / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "../elsewhere/ckpt-1"\n')
  with pytest.raises(ConversionError, match="points outside"):
    _tf_checkpoint.read_tf_checkpoint(tmp_path / "ckpt")


def test_savedmodel_directory_is_not_a_tf_checkpoint(fixtures):
  with pytest.raises(ConversionError, match="read_savedmodel"):
    _tf_checkpoint.read_tf_checkpoint(fixtures / "mlp.export")


def test_reading_imports_no_tensorflow(fixtures):
  code = (
    "import sys\n"
    "from adamjax.convert import _tensorbundle, _tf_checkpoint\n"
    f"_tensorbundle.read_bundle({str(fixtures / 'mlp.sharded' / 'ckpt')!r})\n"
    f"_tf_checkpoint.read_tf_checkpoint({str(fixtures / 'tfk_cnn_legacy.ckpt')!r})\n"
    f"_tf_checkpoint.read_savedmodel({str(fixtures / 'cnn.export')!r})\n"
    "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
    "('tensorflow', 'tf_keras', 'keras'))\n"
    "assert not loaded, loaded\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    cwd=HERE.parent,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Hostile bundles: real ones, patched
# --------------------------------------------------------------------------------------------


_varint = convert_fuzz.varint
_field = convert_fuzz.varint_field  # Appended to a message, it overrides the earlier value.


def _write_table(path: pathlib.Path, items, compression: int = 0) -> None:
  path.write_bytes(convert_fuzz.write_table(items, compression))


def _copy(fixtures, tmp_path, name="mlp.ckpt") -> pathlib.Path:
  source = fixtures / _manifest(fixtures)[name]
  shutil.copytree(source.parent, tmp_path / "copy")
  return tmp_path / "copy" / source.name


def _patch_index(prefix: pathlib.Path, edit) -> None:
  items = _wire.read_table((prefix.parent / (prefix.name + ".index")).read_bytes())
  _write_table(prefix.parent / (prefix.name + ".index"), edit(items))


def _patch_entry(prefix, key, extra: bytes) -> None:
  _patch_index(prefix, lambda items: [(k, v + extra if k == key.encode() else v) for k, v in items])


KERNEL = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"  # The 784x128 kernel.


def _refused(prefix, match: str, key: str | None = None) -> str:
  with pytest.raises(ConversionError, match=match) as info:
    _tensorbundle.read_bundle(prefix)
  message = str(info.value)
  assert str(prefix) in message
  if key is not None:
    assert key in message
  return message


def test_patched_index_still_reads(fixtures, tmp_path):
  # The test's table writer is faithful: re-emitting an unmodified index changes nothing.
  prefix = _copy(fixtures, tmp_path)
  before = _tensorbundle.read_bundle(prefix)
  _patch_index(prefix, lambda items: items)
  after = _tensorbundle.read_bundle(prefix)
  assert sorted(before) == sorted(after)
  assert all(
    before[k].tobytes() == after[k].tobytes() for k in before if k != _tensorbundle.OBJECT_GRAPH_KEY
  )


def test_refuses_out_of_range_offset(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, KERNEL, _field(4, 10**12))
  _refused(prefix, "out of range", KERNEL)


def test_refuses_size_that_does_not_match_the_shape(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, KERNEL, _field(5, 784 * 128 * 4 - 4))
  _refused(prefix, "size mismatch", KERNEL)


def test_refuses_corrupt_data(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  entry = _tensorbundle.BundleReader(prefix).entry(KERNEL)
  data = prefix.parent / f"{prefix.name}.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  raw[entry.offset + 1000] ^= 0x01
  data.write_bytes(bytes(raw))
  _refused(prefix, "CRC32C mismatch", KERNEL)
  assert _tensorbundle.read_bundle(prefix, verify_crc=False)[KERNEL].shape == (784, 128)


@pytest.mark.parametrize(
  "dtype,match", [(21, "DT_VARIANT"), (20, "DT_RESOURCE"), (99, "unknown or unsupported dtype")]
)
def test_refuses_variant_resource_and_unknown_dtypes(fixtures, tmp_path, dtype, match):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, KERNEL, _field(1, dtype))
  _refused(prefix, match, KERNEL)


def test_refuses_big_endian_bundles(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, "", _field(2, 1))  # BundleHeaderProto.endianness = BIG.
  _refused(prefix, "big-endian")


def test_refuses_too_many_shards(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, "", _field(1, 10**6))
  _refused(prefix, "1000000 shards")


def test_refuses_bundles_over_the_size_limit(fixtures):
  prefix = fixtures / _manifest(fixtures)["mlp.ckpt"]
  with pytest.raises(ConversionError, match="over the 100000-byte limit"):
    _tensorbundle.BundleReader(prefix, max_bytes=100_000)


@pytest.mark.parametrize(
  ("slices", "match"), [(1_000, "overlap"), (11_000, "over the 4294967296-byte limit")]
)
def test_refuses_slices_that_share_bytes(fixtures, tmp_path, slices, match):
  """Slice entries all pointing at one 401 kB kernel: 1,000 would decode to 401 MB from a
  1.2 MB bundle (refused as overlapping), 11,000 to 4.4 GB (over the decoded-bytes budget)."""
  prefix = _copy(fixtures, tmp_path)
  _patch_index(
    prefix, lambda items: convert_fuzz.slice_bomb(items, KERNEL.encode(), slices) or items
  )
  with pytest.raises(ConversionError, match=match) as info:
    _tensorbundle.BundleReader(prefix)
  assert str(prefix) in str(info.value) and len(str(info.value)) < 1000


def test_refuses_shard_id_outside_the_bundle(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  _patch_entry(prefix, KERNEL, _field(3, 7))
  _refused(prefix, "shard_id 7", KERNEL)


def test_refuses_truncated_index(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  index = prefix.parent / f"{prefix.name}.index"
  raw = index.read_bytes()
  index.write_bytes(raw[:-100])
  _refused(prefix, "truncated")
  # A footer that survives but points past what is left of the blocks.
  index.write_bytes(raw[: len(raw) // 2] + raw[-48:])
  _refused(prefix, "past the end")
  index.write_bytes(raw[:20])
  _refused(prefix, "too short")


def test_refuses_bad_footer_magic(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  index = prefix.parent / f"{prefix.name}.index"
  raw = bytearray(index.read_bytes())
  raw[-1] ^= 0xFF
  index.write_bytes(bytes(raw))
  _refused(prefix, "bad table magic")


def test_refuses_corrupt_and_compressed_index_blocks(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  index = prefix.parent / f"{prefix.name}.index"
  raw = index.read_bytes()
  corrupt = bytearray(raw)
  corrupt[10] ^= 0x01  # Inside the first data block.
  index.write_bytes(bytes(corrupt))
  _refused(prefix, "CRC32C mismatch")
  _write_table(index, _wire.read_table(raw), compression=1)
  _refused(prefix, "Snappy")


def test_refuses_missing_shard_and_missing_slice(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path, "mlp.sharded")
  reader = _tensorbundle.BundleReader(prefix)
  dropped = next(k for k, _ in _wire.read_table(_index_bytes(prefix)) if k.startswith(b"\0"))
  _patch_index(prefix, lambda items: [kv for kv in items if kv[0] != dropped])
  _refused(prefix, "has no entry in the index")
  last = (
    prefix.parent / f"{prefix.name}.data-{reader.header.num_shards - 1:05d}-of-"
    f"{reader.header.num_shards:05d}"
  )
  last.unlink()
  _refused(prefix, "missing data file")


def _index_bytes(prefix: pathlib.Path) -> bytes:
  return (prefix.parent / f"{prefix.name}.index").read_bytes()


def test_refuses_registered_saver(fixtures, tmp_path):
  prefix = _copy(fixtures, tmp_path)
  key = _tensorbundle.OBJECT_GRAPH_KEY
  graph = _tensorbundle.read_bundle(prefix)[key].item()
  saver = b"\x0a\x08my_saver"  # RegisteredSaver.name
  node = b"\x22" + _varint(len(saver)) + saver  # TrackableObject.registered_saver
  graph += b"\x0a" + _varint(len(node)) + node  # TrackableObjectGraph.nodes (appended)
  # Re-encode the scalar string tensor as WriteStringTensor does, at the end of the data file.
  length = struct.pack("<I", len(graph))
  length_crc = struct.pack("<I", _wire.mask_crc(_wire.crc32c(length)))
  payload = _varint(len(graph)) + length_crc + graph
  crc = _wire.mask_crc(_wire.crc32c(length + length_crc + graph))
  data = prefix.parent / f"{prefix.name}.data-00000-of-00001"
  offset = data.stat().st_size
  with open(data, "ab") as f:
    f.write(payload)
  _patch_entry(
    prefix, key, _field(4, offset) + _field(5, len(payload)) + b"\x35" + struct.pack("<I", crc)
  )
  assert _tensorbundle.read_bundle(prefix)[key].item() == graph
  with pytest.raises(ConversionError, match="registered_saver 'my_saver'") as info:
    _tf_checkpoint.read_tf_checkpoint(prefix)
  assert str(prefix) in str(info.value) and key in str(info.value)
