"""Untrusted HDF5 and zip files read as data only, and atomic output files.

HDF5 can do more than hold arrays: links to other files (external links), datasets whose bytes
live in other files (external raw storage, virtual datasets), object references, variable-length
and string data, and shapes far larger than the bytes stored. :class:`SafeH5` walks a whole file
once before anything is read and refuses all of that (policy in the converter's security notes;
``keras/src/saving/saving_lib.py`` ``safe_get_h5_dataset`` applies a subset of the same checks).
Zip archives are read member by member into memory, never extracted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from adamjax.convert._ir import ConversionError, KerasCheckpoint

# Total bytes the arrays of one checkpoint may declare. Every reader takes ``max_bytes`` to
# raise it for a bigger model; the cap is there so a few bytes of header cannot ask for
# terabytes.
DEFAULT_MAX_BYTES = 4 << 30
_MAX_OBJECTS = 1_000_000
_MAX_ATTRIBUTE_CHARS = 64 << 20
# A dataset may not declare more than this many times the bytes it stores (a compressed
# "shape bomb"), above a floor where the ratio is meaningless. Keras uses 1000 over 4 GiB.
_BOMB_FLOOR_BYTES = 1 << 20
_BOMB_MAX_EXPANSION = 1000
# Keras stores the members of a .keras archive uncompressed (ZIP_STORED); a deflated member
# may not inflate to more than this many times its compressed size (above the same floor).
_ZIP_MAX_EXPANSION = 100
_NUMERIC_KINDS = "fiub"
# What h5py raises on damaged metadata: OSError and RuntimeError from the HDF5 library, and
# KeyError, TypeError ("Unknown string encoding"), ValueError, UnicodeDecodeError, ... from its
# Python layer. Caught only around h5py calls (SafeH5, open_h5), never around the readers' logic.
H5_ERRORS = (
  OSError,
  RuntimeError,
  KeyError,
  TypeError,
  ValueError,
  IndexError,
  OverflowError,
  UnicodeError,
  AttributeError,
)


def clip(value: object, limit: int = 100) -> str:
  """``value`` (a name, key or string taken from a file) quoted for an error message.

  Written as ``repr`` (so control characters, undecodable bytes and lone surrogates are
  escaped) and cut to about ``limit`` characters, saying how long it was: a hostile file's
  8 MB layer name becomes a short, printable quotation.
  """
  text = repr(value)
  if len(text) <= limit:
    return text
  return f"{text[:limit]}... ({len(text)} characters)"


def _h5py():
  try:
    import h5py
  except ImportError as e:  # pragma: no cover - h5py is a dependency of adamjax[convert]
    raise ConversionError("reading HDF5 needs h5py: pip install adamjax[convert]") from e
  return h5py


class SafeH5:
  """An HDF5 file checked, as a whole, to hold only groups and plain numeric datasets.

  Construct it on an open ``h5py.File``; the constructor walks every object and raises on the
  first thing that is not allowed, so the accessors below only ever touch checked objects.

  Attributes:
    groups: Every group path (``""`` for the root, ``"layers/dense/vars"``), in the order the
      writer created them (HDF5 object addresses: a file written once in sequence allocates
      them in order; h5py itself lists names alphabetically).
    datasets: Dataset path -> (shape, dtype), in the same order.
  """

  def __init__(self, file: Any, source: str, max_bytes: int = DEFAULT_MAX_BYTES):
    self.file = file
    self.source = source
    self.groups: list[str] = []
    self.datasets: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._walk(max_bytes)

  def _error(self, path: str, reason: str) -> ConversionError:
    return ConversionError(f"{self.source}: refusing HDF5 object /{clip(path)[1:-1]}: {reason}")

  @contextlib.contextmanager
  def _boundary(self, path: str) -> Iterator[None]:
    """h5py's errors on damaged metadata (of many types) as a ConversionError naming ``path``."""
    try:
      yield
    except ConversionError:
      raise
    except H5_ERRORS as e:
      raise self._error(path, f"unreadable ({type(e).__name__}: {clip(str(e), 200)})") from None

  def _walk(self, max_bytes: int) -> None:
    with self._boundary(""):
      self._walk_unchecked(max_bytes)

  def _walk_unchecked(self, max_bytes: int) -> None:
    h5py = _h5py()
    total = 0
    found: list[tuple[int, str, Any]] = []  # (address, path, object)
    stack = [("", self.file)]
    while stack:
      path, group = stack.pop()
      found.append((h5py.h5o.get_info(group.id).addr, path, group))
      if len(found) > _MAX_OBJECTS:
        raise self._error(path, f"more than {_MAX_OBJECTS} objects")
      for name in group:
        child = f"{path}/{name}" if path else name
        link = group.get(name, getlink=True)
        # Checked before the link is followed: following it is what would open the
        # other file.
        if isinstance(link, h5py.ExternalLink):
          raise self._error(child, f"external link to {link.filename}:{link.path}")
        if isinstance(link, h5py.SoftLink):
          raise self._error(child, f"soft link to {link.path}")
        kind = group.get(name, getclass=True)
        if kind not in (h5py.Group, h5py.Dataset):
          raise self._error(child, f"a {getattr(kind, '__name__', kind)}, not a group or dataset")
        obj = group[name]
        # Keras writes every object once; a second hard link makes an alias or a cycle.
        if h5py.h5o.get_info(obj.id).rc != 1:
          raise self._error(child, "an object reachable by several paths (hard links)")
        if kind is h5py.Group:
          stack.append((child, obj))
        else:
          total += self._check_dataset(child, obj)
          if total > max_bytes:
            raise self._error(
              child, f"the datasets declare more than max_bytes={max_bytes} bytes in total"
            )
          found.append((h5py.h5o.get_info(obj.id).addr, child, obj))
    for _, path, obj in sorted(found, key=lambda f: f[0]):
      if isinstance(obj, h5py.Dataset):
        self.datasets[path] = (obj.shape, obj.dtype)
      else:
        self.groups.append(path)

  def _check_dataset(self, path: str, ds: Any) -> int:
    dtype = ds.dtype
    if (
      dtype.kind not in _NUMERIC_KINDS
      or dtype.fields is not None
      or dtype.subdtype
      or dtype.itemsize > 8
    ):
      # Keras writes bfloat16 as 2-byte opaque data (saving_lib.H5IOStore.__setitem__).
      hint = "; bfloat16 variables are not supported" if dtype.kind == "V" else ""
      raise self._error(
        path,
        f"dtype {dtype} is not a plain number type (object, "
        "string, variable-length, reference and compound data are "
        f"refused{hint})",
      )
    if ds.external:
      raise self._error(path, f"its data is stored in external files {ds.external}")
    if ds.is_virtual:
      raise self._error(path, "a virtual dataset (its data comes from other files)")
    if ds.shape is None:
      raise self._error(path, "a dataset with no shape (null dataspace)")
    declared = math.prod(ds.shape) * dtype.itemsize
    stored = ds.id.get_storage_size()
    if declared > _BOMB_FLOOR_BYTES and declared > _BOMB_MAX_EXPANSION * stored:
      raise self._error(path, f"declares {declared} bytes but stores {stored}")
    return declared

  def read(self, path: str) -> np.ndarray:
    """A checked dataset's values (0-d datasets as 0-d arrays), in the stored dtype."""
    if path not in self.datasets:
      raise ConversionError(f"{self.source}: no dataset /{clip(path)}")
    with self._boundary(path):
      value = np.asarray(self.file[path][()])
    if value.shape != self.datasets[path][0]:
      raise self._error(path, f"read shape {value.shape}, declared {self.datasets[path][0]}")
    if not value.dtype.isnative:
      # Big-endian data (h5py keeps the file's byte order); JAX holds native order only.
      value = value.astype(value.dtype.newbyteorder("="))
    return value

  def lazy(self, path: str) -> np.ndarray | LazyDataset:
    """A checked dataset to read later (see :class:`LazyDataset`); tiny ones are read now."""
    if path not in self.datasets:
      raise ConversionError(f"{self.source}: no dataset /{clip(path)}")
    shape, dtype = self.datasets[path]
    if math.prod(shape) <= _EAGER_ELEMENTS:
      return self.read(path)
    return LazyDataset(self, path, shape, dtype)

  def attr_string(self, path: str, name: str) -> str | None:
    """A string attribute of a checked object, or None if absent.

    Raises:
      ConversionError: if the attribute is not a single string.
    """
    value = self._attr(path, name)
    if value is None:
      return None
    if isinstance(value, np.ndarray) and value.shape == ():
      value = value[()]
    if isinstance(value, bytes):
      value = self._decode(path, name, value)
    if not isinstance(value, str):
      raise self._error(path, f"attribute {clip(name)} is not a string")
    return value

  def _decode(self, path: str, name: str, value: bytes) -> str:
    try:
      return value.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
      raise self._error(
        path, f"attribute {clip(name)} is not UTF-8 text ({clip(value[:40])})"
      ) from None

  def attr_strings(self, path: str, name: str) -> list[str] | None:
    """A 1-d string-array attribute (tf-keras's ``layer_names``, ``weight_names``)."""
    value = self._attr(path, name)
    if value is None:
      return None
    if not isinstance(value, np.ndarray) or value.ndim != 1:
      raise self._error(path, f"attribute {name!r} is not a list of strings")
    out = []
    for item in value.tolist():
      if isinstance(item, bytes):
        item = self._decode(path, name, item)
      if not isinstance(item, str):
        raise self._error(path, f"attribute {name!r} holds a non-string")
      out.append(item)
    return out

  def _attr(self, path: str, name: str) -> Any:
    with self._boundary(path):
      return self._attr_unchecked(path, name)

  def _attr_unchecked(self, path: str, name: str) -> Any:
    h5py = _h5py()
    if path not in self.datasets and path not in self.groups:
      raise ConversionError(f"{self.source}: no object /{path}")
    obj = self.file[path] if path else self.file
    if name not in obj.attrs:
      return None
    attr = obj.attrs.get_id(name)
    if attr.shape == (0,):
      # tf-keras writes an empty list (no weights) as an empty float64 array.
      return np.array([], dtype=object)
    # Attributes are read only as strings: never references or other object data.
    if h5py.check_string_dtype(attr.dtype) is None:
      raise self._error(path, f"attribute {name!r} has dtype {attr.dtype}, not a string")
    if math.prod(attr.shape or ()) * max(attr.dtype.itemsize, 1) > _MAX_ATTRIBUTE_CHARS:
      raise self._error(path, f"attribute {name!r} is too large")
    try:
      value = obj.attrs[name]
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise self._error(path, f"attribute {name!r} is unreadable ({e})") from None
    chars = sum(len(v) for v in np.ravel(value)) if isinstance(value, np.ndarray) else len(value)
    if chars > _MAX_ATTRIBUTE_CHARS:
      raise self._error(path, f"attribute {name!r} is too large")
    return value


# Datasets up to this many elements (an optimizer's scalars) are read at once by SafeH5.lazy.
_EAGER_ELEMENTS = 16


@dataclasses.dataclass(frozen=True)
class LazyDataset:
  """A checked dataset not read yet: its declared shape and dtype, for the cross-checks.

  The HDF5 readers check the whole layout (variable counts against the config, every slot's
  shape and dtype against its variable) on these before any array payload is read, so a file
  whose layout is wrong costs no memory; :func:`materialize` reads them at the end.
  """

  h5: SafeH5
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)


def materialize(ckpt: KerasCheckpoint) -> KerasCheckpoint:
  """Reads every :class:`LazyDataset` of ``ckpt`` in place (its files must still be open)."""

  def load(value: Any) -> Any:
    return value.h5.read(value.path) if isinstance(value, LazyDataset) else value

  for layer in ckpt.layers:
    layer.weights = {k: load(v) for k, v in layer.weights.items()}
  opt = ckpt.optimizer
  if opt is not None:
    opt.momentums = {k: load(v) for k, v in opt.momentums.items()}
    opt.velocities = {k: load(v) for k, v in opt.velocities.items()}
    opt.velocity_hats = {k: load(v) for k, v in opt.velocity_hats.items()}
  return ckpt


@contextlib.contextmanager
def open_h5(
  data: bytes | str | os.PathLike, source: str, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[SafeH5]:
  """Opens an HDF5 file (a path, or bytes held in memory) read-only and checks all of it.

  Raises:
    ConversionError: if it is not HDF5 or holds anything :class:`SafeH5` refuses.
  """
  h5py = _h5py()
  target = io.BytesIO(data) if isinstance(data, bytes) else os.fspath(data)
  try:
    file = h5py.File(target, "r")
  except H5_ERRORS as e:
    raise ConversionError(
      f"{source}: not a readable HDF5 file ({type(e).__name__}: {clip(str(e), 200)})"
    ) from None
  with file:
    yield SafeH5(file, source, max_bytes)


# What zipfile raises on damaged headers or data (NotImplementedError: an odd "version needed"
# or compression method; zlib.error: bad deflate data; EOFError: truncated data).
_ZIP_ERRORS = (
  zipfile.BadZipFile,
  OSError,
  ValueError,
  NotImplementedError,
  RuntimeError,
  EOFError,
  zlib.error,
  struct.error,
  UnicodeError,
)

_MEMBER_NAME = re.compile(r"^[^/\\:\x00]+(/[^/\\:\x00]+)*/?$")


def read_zip(
  path: str | os.PathLike,
  allowed: frozenset[str],
  ignored_prefix: str,
  max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, bytes]:
  """Reads the allowed members of a zip archive into memory, checking every member first.

  Args:
    path: The archive.
    allowed: The member names to read; any other member is refused, except those under
      ``ignored_prefix``, which are skipped unread.
    ignored_prefix: A folder whose members are tolerated and ignored (``"assets/"``).
    max_bytes: Cap on the sum of the declared sizes of the members read.

  Returns:
    Member name -> contents, for the allowed members present.

  Raises:
    ConversionError: for a non-zip file, a member name with ``..``, an absolute or drive
      path or a backslash, duplicate or encrypted members, an unexpected member, or declared
      sizes over ``max_bytes``.
  """
  source = os.fspath(path)
  try:
    archive = zipfile.ZipFile(path, "r")
  except _ZIP_ERRORS as e:
    raise ConversionError(
      f"{source}: not a readable zip archive ({type(e).__name__}: {clip(str(e), 200)})"
    ) from None
  with archive:
    infos = archive.infolist()
    names = [info.filename for info in infos]
    for name in names:
      parts = name.rstrip("/").split("/")
      if not _MEMBER_NAME.match(name) or ".." in parts or "." in parts:
        raise ConversionError(
          f"{source}: refusing zip member {clip(name)}: absolute, "
          "parent-relative or malformed member names are not "
          "allowed"
        )
    if len(set(names)) != len(names):
      raise ConversionError(f"{source}: refusing a zip archive with duplicate members")
    total = 0
    wanted = []
    for info in infos:
      if info.filename.startswith(ignored_prefix):
        continue
      if info.filename not in allowed:
        raise ConversionError(
          f"{source}: refusing unexpected zip member "
          f"{clip(info.filename)} (allowed: {sorted(allowed)} and "
          f"{ignored_prefix}*)"
        )
      if info.flag_bits & 0x1:
        raise ConversionError(f"{source}: refusing encrypted zip member {clip(info.filename)}")
      if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ConversionError(
          f"{source}: refusing zip member {clip(info.filename)}: compression method "
          f"{info.compress_type} (Keras writes stored or deflated members)"
        )
      if info.file_size > _BOMB_FLOOR_BYTES and info.file_size > _ZIP_MAX_EXPANSION * max(
        info.compress_size, 1
      ):
        raise ConversionError(
          f"{source}: refusing zip member {clip(info.filename)}: declares {info.file_size} "
          f"bytes, compressed to {info.compress_size} (a zip bomb?)"
        )
      # The declared size bounds what zipfile will inflate (it stops there and checks the
      # CRC), so checking it bounds the memory used.
      total += info.file_size
      if total > max_bytes:
        raise ConversionError(
          f"{source}: refusing zip member {clip(info.filename)}: the "
          f"members declare more than max_bytes={max_bytes} bytes "
          f"({info.file_size} for this one)"
        )
      wanted.append(info)
    out = {}
    for info in wanted:
      try:
        out[info.filename] = archive.read(info)
      except _ZIP_ERRORS as e:
        raise ConversionError(
          f"{source}: zip member {clip(info.filename)} is unreadable "
          f"({type(e).__name__}: {clip(str(e), 200)})"
        ) from None
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
  """Yields a temporary path beside ``path``; on success it replaces ``path`` in one step.

  The package's one atomic-write helper (the Keras writers, the converted Orbax directory).
  A reader of ``path`` sees either the old file or the complete new one, never a partial
  write; on an error the temporary file is removed and ``path`` is untouched.

  Args:
    path: The file (or, with ``directory=True``, the directory) to write.
    directory: Yield an empty temporary directory instead of a file. An existing ``path``
      directory is removed just before the new one is renamed into place.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  if directory:
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
  else:
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
  # mkstemp/mkdtemp make the result private; give it the mode open()/mkdir() would.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)
  try:
    yield tmp
    if directory and os.path.isdir(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    if directory:
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    raise
