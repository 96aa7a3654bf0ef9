"""Read TensorFlow TensorBundle checkpoints (``tf.train.Checkpoint``, SavedModel variables) as data.

A TensorBundle is what ``tf.train.Checkpoint.save``/``write`` and ``tf.saved_model.save`` write:
``<prefix>.index`` (a table of ``BundleEntryProto``, one per tensor) and the raw tensor bytes in
``<prefix>.data-<i>-of-<n>`` shards (``tensorflow/core/util/tensor_bundle/tensor_bundle.h``).
This reader needs only numpy: it never imports TensorFlow, never decodes ``DT_VARIANT``
tensors (whose decoders are registered C++ code), and treats every offset and size in the files
as hostile. Everything it refuses raises :class:`~adamjax.convert._ir.ConversionError` naming the
file, the key and the problem.

Example::

    tensors = read_bundle("/ckpts/ckpt-3")        # {"optimizer/_iterations/...": array(3), ...}
    reader = BundleReader("/ckpts/ckpt-3")
    reader.entry("save_counter/.ATTRIBUTES/VARIABLE_VALUE").shape   # ()

The object graph (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` string) is decoded in ``_tf_graph.py``.

References:
  ``tensorflow/core/util/tensor_bundle/tensor_bundle.cc`` (reader and writer),
  ``tensorflow/core/protobuf/tensor_bundle.proto``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from adamjax.convert import _wire
from adamjax.convert._ir import ConversionError
from adamjax.convert._safe_io import DEFAULT_MAX_BYTES, clip
from adamjax.convert._wire import FIXED32, LENGTH_DELIMITED, VARINT, WireFormatError

__all__ = ["OBJECT_GRAPH_KEY", "BundleEntry", "BundleHeader", "BundleReader", "read_bundle"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# Limits on what a file may declare before anything is allocated. Real checkpoints are far
# below them; callers with larger ones pass their own.
MAX_SHARDS = 10_000
MAX_BYTES = DEFAULT_MAX_BYTES  # Sum of the tensor sizes of one bundle.
MAX_INDEX_BYTES = 2**30
_MAX_RANK = 254  # TensorShape::MaxDimensions() in tensorflow/core/framework/tensor_shape.h.

# tensorflow/core/framework/types.proto -> little-endian numpy dtype (itemsize is the on-disk
# width). bfloat16/float8 come from ml_dtypes (a jax dependency), imported only when met.
_NUMPY_DTYPES = {
  1: "<f4",
  2: "<f8",
  3: "<i4",
  4: "|u1",
  5: "<i2",
  6: "|i1",
  8: "<c8",
  9: "<i8",
  10: "|b1",
  17: "<u2",
  18: "<c16",
  19: "<f2",
  22: "<u4",
  23: "<u8",
}
_ML_DTYPES = {14: "bfloat16", 24: "float8_e5m2", 25: "float8_e4m3fn"}
DT_STRING, DT_RESOURCE, DT_VARIANT = 7, 20, 21
_REFUSED_DTYPES = {
  DT_RESOURCE: "DT_RESOURCE (a handle to runtime state, not data)",
  DT_VARIANT: "DT_VARIANT (decoded by registered C++ code; refused as unsafe)",
}


@dataclasses.dataclass(frozen=True)
class BundleHeader:
  """``BundleHeaderProto``: the entry under the empty key, always first in the index.

  Attributes:
    num_shards: How many ``.data-*`` files the bundle has.
    producer, min_consumer: The ``VersionDef`` of the writer.
  """

  num_shards: int
  producer: int
  min_consumer: int


@dataclasses.dataclass(frozen=True)
class BundleEntry:
  """``BundleEntryProto``: where one tensor (or one slice of a partitioned tensor) lives.

  Attributes:
    key: The tensor's name (for a slice entry, the full tensor's name).
    dtype: The ``DataType`` enum value (1 = float32, 9 = int64, 7 = string, ...).
    shape: The tensor's shape (for a slice entry, the slice's).
    shard_id: Which ``.data-<shard_id>-of-<n>`` file holds the bytes.
    offset, size: The byte range in that file.
    crc32c: The masked CRC32C of those bytes.
    slices: For a partitioned tensor, ``(start, length)`` per dimension of each stored slice
      (``length == -1``: the whole dimension); its own bytes are then empty.
  """

  key: str
  dtype: int
  shape: tuple[int, ...]
  shard_id: int
  offset: int
  size: int
  crc32c: int
  slices: tuple[tuple[tuple[int, int], ...], ...] = ()


def _numpy_dtype(code: int) -> np.dtype:
  if code in _NUMPY_DTYPES:
    return np.dtype(_NUMPY_DTYPES[code])
  import ml_dtypes  # pylint: disable=import-outside-toplevel

  return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))


class BundleReader:
  """Reads the index of a TensorBundle and, on request, its tensors.

  Opening validates every entry of the index (dtype, shape, shard, byte range against the
  shard's size, declared size against the shape); reading checks the CRC32C of every tensor.

  Args:
    prefix: The checkpoint prefix (``.../ckpt-3``, ``.../variables/variables``), or the path
      of its ``.index`` file.
    verify_crc: Check each tensor's CRC32C as it is read (the block CRCs of the index are
      always checked).
    max_shards: Refuse bundles that declare more data files than this.
    max_bytes: Refuse bundles whose tensors add up to more bytes than this.

  Raises:
    ConversionError: if the index is missing, malformed or unsafe (see the module docstring).
  """

  def __init__(
    self,
    prefix: str | os.PathLike,
    *,
    verify_crc: bool = True,
    max_shards: int = MAX_SHARDS,
    max_bytes: int = MAX_BYTES,
  ):
    prefix = os.fspath(prefix)
    self.prefix = prefix.removesuffix(".index")
    self.verify_crc = verify_crc
    self.index_path = self.prefix + ".index"
    self._shard_sizes: dict[int, int] = {}
    try:
      size = os.path.getsize(self.index_path)
    except (OSError, ValueError) as e:
      raise ConversionError(
        f"{self.index_path}: cannot read the TensorBundle index ({e})"
      ) from None
    if size > MAX_INDEX_BYTES:
      raise ConversionError(
        f"{self.index_path}: index of {size} bytes exceeds the {MAX_INDEX_BYTES}-byte limit"
      )
    with open(self.index_path, "rb") as f:
      raw = f.read()
    try:
      table = _wire.read_table(raw)
    except WireFormatError as e:
      raise ConversionError(f"{self.index_path}: {e}") from None
    if not table or table[0][0] != b"":
      raise ConversionError(
        f"{self.index_path}: no header entry (the empty key must come "
        "first): not a TensorBundle index"
      )
    self.header = self._parse_header(table[0][1])
    if not 0 < self.header.num_shards <= max_shards:
      raise ConversionError(
        f"{self.index_path}: header declares "
        f"{self.header.num_shards} shards (allowed: 1 to {max_shards})"
      )
    self._entries: dict[str, BundleEntry] = {}
    self._slices: dict[bytes, BundleEntry] = {}
    for raw_key, value in table[1:]:
      if raw_key.startswith(b"\x00"):
        # Slice keys (EncodeTensorNameSlice) start with OrderedCode's 0; they are
        # reached through their full tensor's entry, so the name is not decoded here.
        name = raw_key.decode("utf-8", "backslashreplace")
        self._slices[raw_key] = self._parse_entry(name, value)
      else:
        key = self._decode_key(raw_key)
        self._entries[key] = self._parse_entry(key, value)
    # What reading decodes: each tensor at its declared size (a partitioned one is allocated
    # whole, from its slice entries), before any of it is read.
    total = sum(
      math.prod(e.shape) * _numpy_dtype(e.dtype).itemsize if e.slices else e.size
      for e in self._entries.values()
    )
    if total > max_bytes:
      raise ConversionError(
        f"{self.index_path}: tensors add up to {total} bytes, over the {max_bytes}-byte limit"
      )
    for entry in (*self._entries.values(), *self._slices.values()):
      self._check_range(entry)
    self._check_disjoint()

  # -- index ---------------------------------------------------------------------------------

  def _fail(self, key: str, problem: str) -> ConversionError:
    return ConversionError(f"{self.index_path}: entry {clip(key)}: {problem}")

  def _decode_key(self, raw_key: bytes) -> str:
    try:
      return raw_key.decode("utf-8")
    except UnicodeDecodeError:
      raise ConversionError(f"{self.index_path}: key {clip(raw_key)} is not UTF-8") from None

  def _parse_header(self, value: bytes) -> BundleHeader:
    try:
      fields = _wire.parse_message(value)
      endianness = _wire.scalar(fields, 2, VARINT)
      version = _wire.parse_message(_wire.scalar(fields, 3, LENGTH_DELIMITED, b""))
      header = BundleHeader(
        num_shards=_wire.to_signed64(_wire.scalar(fields, 1, VARINT)),
        producer=_wire.to_signed64(_wire.scalar(version, 1, VARINT)),
        min_consumer=_wire.to_signed64(_wire.scalar(version, 2, VARINT)),
      )
      bad_consumers = _wire.repeated(version, 3, VARINT)
    except WireFormatError as e:
      raise self._fail("", f"header is not a BundleHeaderProto ({e})") from None
    if endianness != 0:
      # TF byte-swaps such bundles on read (ByteSwapTensor); they come only from
      # big-endian hosts, and this reader refuses them rather than carry that path.
      raise self._fail(
        "", "big-endian bundle (BundleHeaderProto.endianness = BIG) is not supported"
      )
    # CheckVersions(header.version(), kTensorBundleVersion = 1, kTensorBundleMinProducer).
    if header.min_consumer > 1 or 1 in bad_consumers:
      raise self._fail(
        "",
        f"written for a newer TensorBundle reader (min_consumer "
        f"{header.min_consumer}, bad_consumers {bad_consumers})",
      )
    return header

  def _parse_entry(self, key: str, value: bytes) -> BundleEntry:
    try:
      fields = _wire.parse_message(value)
      shape_fields = _wire.parse_message(_wire.scalar(fields, 2, LENGTH_DELIMITED, b""))
      if _wire.scalar(shape_fields, 3, VARINT):
        raise self._fail(key, "shape is unknown_rank")
      shape = tuple(
        _wire.to_signed64(_wire.scalar(_wire.parse_message(dim), 1, VARINT))
        for dim in _wire.repeated(shape_fields, 2, LENGTH_DELIMITED)
      )
      slices = tuple(
        self._parse_slice(key, s, shape) for s in _wire.repeated(fields, 7, LENGTH_DELIMITED)
      )
      entry = BundleEntry(
        key=key,
        dtype=_wire.scalar(fields, 1, VARINT),
        shape=shape,
        shard_id=_wire.to_signed64(_wire.scalar(fields, 3, VARINT)),
        offset=_wire.to_signed64(_wire.scalar(fields, 4, VARINT)),
        size=_wire.to_signed64(_wire.scalar(fields, 5, VARINT)),
        crc32c=_wire.scalar(fields, 6, FIXED32),
        slices=slices,
      )
    except WireFormatError as e:
      raise self._fail(key, f"not a BundleEntryProto ({e})") from None
    if entry.dtype in _REFUSED_DTYPES:
      raise self._fail(key, f"dtype {_REFUSED_DTYPES[entry.dtype]} is refused")
    if entry.dtype != DT_STRING and entry.dtype not in _NUMPY_DTYPES | _ML_DTYPES:
      raise self._fail(key, f"unknown or unsupported dtype enum {entry.dtype}")
    if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
      raise self._fail(key, f"invalid shape {shape}")
    if not 0 <= entry.shard_id < self.header.num_shards:
      raise self._fail(
        key, f"shard_id {entry.shard_id} is outside the bundle's {self.header.num_shards} shards"
      )
    if entry.offset < 0 or entry.size < 0:
      raise self._fail(key, f"negative offset {entry.offset} or size {entry.size}")
    num_elements = math.prod(shape)
    if slices:
      if entry.size != 0:
        raise self._fail(key, "a partitioned tensor's own entry must hold no bytes")
    elif entry.dtype == DT_STRING:
      # Each element needs at least a 1-byte varint length (GetValue's lower bound).
      if entry.size < num_elements + (4 if num_elements else 0):
        raise self._fail(key, f"size {entry.size} is too small for {num_elements} strings")
    elif entry.size != num_elements * _numpy_dtype(entry.dtype).itemsize:
      raise self._fail(
        key,
        f"size mismatch: {entry.size} bytes stored, but shape {shape} "
        f"of {_numpy_dtype(entry.dtype).name} needs "
        f"{num_elements * _numpy_dtype(entry.dtype).itemsize}",
      )
    return entry

  def _parse_slice(self, key: str, value: bytes, shape: tuple[int, ...]):
    extents = []
    for extent in _wire.repeated(_wire.parse_message(value), 1, LENGTH_DELIMITED):
      fields = _wire.parse_message(extent)
      start = _wire.to_signed64(_wire.scalar(fields, 1, VARINT))
      # ``length`` is in a oneof: absent means the whole dimension (TensorSlice::IsFull).
      length = _wire.to_signed64(_wire.scalar(fields, 2, VARINT)) if 2 in fields else -1
      extents.append((start, length))
    if len(extents) != len(shape):
      raise self._fail(key, f"slice of rank {len(extents)} for a tensor of rank {len(shape)}")
    for (start, length), dim in zip(extents, shape, strict=True):
      if length == -1 and start == 0:
        continue
      if start < 0 or length < 0 or start + length > dim:
        raise self._fail(key, f"slice extent ({start}, {length}) outside dimension {dim}")
    return tuple(extents)

  def _data_path(self, shard_id: int) -> str:
    return f"{self.prefix}.data-{shard_id:05d}-of-{self.header.num_shards:05d}"

  def _check_range(self, entry: BundleEntry) -> None:
    if entry.slices:
      return
    if entry.shard_id not in self._shard_sizes:
      path = self._data_path(entry.shard_id)
      try:
        self._shard_sizes[entry.shard_id] = os.path.getsize(path)
      except OSError as e:
        raise self._fail(entry.key, f"missing data file {path} ({e})") from None
    file_size = self._shard_sizes[entry.shard_id]
    if entry.offset + entry.size > file_size:
      raise self._fail(
        entry.key,
        f"offset {entry.offset} + size {entry.size} is out of "
        f"range of {self._data_path(entry.shard_id)} "
        f"({file_size} bytes)",
      )

  def _check_disjoint(self) -> None:
    """No two entries share bytes: BundleWriter appends each tensor (and each slice) once.

    So the bytes a bundle decodes to are bounded by its data files' sizes; thousands of slice
    entries pointing at the same bytes (a few MB expanding to GiBs) are refused here.
    """
    ranges = sorted(
      (e.shard_id, e.offset, e.offset + e.size, e.key)
      for e in (*self._entries.values(), *self._slices.values())
      if e.size and not e.slices
    )
    for (shard, _, end, key), (shard2, start2, _, key2) in zip(ranges, ranges[1:], strict=False):
      if shard == shard2 and start2 < end:
        raise self._fail(
          key2, f"its bytes overlap those of entry {clip(key)} (each tensor is stored once)"
        )

  # -- public API ----------------------------------------------------------------------------

  def keys(self) -> list[str]:
    """Every tensor's key, in the index's (sorted) order; slice entries are not listed."""
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def entry(self, key: str) -> BundleEntry:
    """The index entry of ``key``.

    Raises:
      KeyError: if the bundle has no tensor ``key``.
    """
    return self._entries[key]

  def read(self, key: str) -> np.ndarray:
    """The tensor stored under ``key``: a numpy array, ``dtype=object`` of bytes for strings.

    Partitioned tensors are reassembled from their slices.

    Raises:
      KeyError: if the bundle has no tensor ``key``.
      ConversionError: if the bytes fail their CRC32C or the slices do not tile the tensor.
    """
    entry = self._entries[key]
    if entry.slices:
      return self._read_partitioned(entry)
    return self._read_value(entry)

  def read_all(self) -> dict[str, np.ndarray]:
    """Every tensor, by key (see :meth:`read`)."""
    return {key: self.read(key) for key in self._entries}

  # -- tensor bytes --------------------------------------------------------------------------

  def _read_bytes(self, entry: BundleEntry) -> bytearray:
    buf = bytearray(entry.size)
    with open(self._data_path(entry.shard_id), "rb") as f:
      f.seek(entry.offset)
      if f.readinto(buf) != entry.size:
        raise self._fail(entry.key, "data file shorter than its entry (truncated)")
    return buf

  def _check_crc(self, entry: BundleEntry, crc: int) -> None:
    if self.verify_crc and _wire.mask_crc(crc) != entry.crc32c:
      raise self._fail(
        entry.key,
        f"CRC32C mismatch in {self._data_path(entry.shard_id)} "
        f"(stored {entry.crc32c:#010x}, computed "
        f"{_wire.mask_crc(crc):#010x}): the data is corrupt",
      )

  def _read_value(self, entry: BundleEntry) -> np.ndarray:
    buf = self._read_bytes(entry)
    if entry.dtype == DT_STRING:
      return self._decode_strings(entry, buf)
    self._check_crc(entry, _wire.crc32c(buf))
    return np.frombuffer(buf, dtype=_numpy_dtype(entry.dtype)).reshape(entry.shape)

  def _decode_strings(self, entry: BundleEntry, buf: bytearray) -> np.ndarray:
    """``[varint64 len]*n [masked crc32c of the lengths] [bytes]*n`` (WriteStringTensor)."""
    n = math.prod(entry.shape)
    if n == 0:
      return np.empty(entry.shape, dtype=object)
    lengths, pos = [], 0
    try:
      for _ in range(n):
        length, pos = _wire.read_varint(buf, pos)
        lengths.append(length)
    except WireFormatError as e:
      raise self._fail(entry.key, f"corrupt string lengths ({e})") from None
    # The checksum covers each length as a little-endian uint32 (uint64 past 4 GiB), not
    # as its varint bytes: ReadStringTensor in tensor_bundle.cc.
    crc = _wire.crc32c(b"".join(v.to_bytes(4 if v <= 0xFFFFFFFF else 8, "little") for v in lengths))
    if pos + 4 + sum(lengths) != len(buf):
      raise self._fail(
        entry.key,
        f"string lengths add up to {pos + 4 + sum(lengths)} bytes, but the entry holds {len(buf)}",
      )
    length_crc = int.from_bytes(buf[pos : pos + 4], "little")
    if self.verify_crc and length_crc != _wire.mask_crc(crc):
      raise self._fail(entry.key, "CRC32C mismatch in the string lengths: the data is corrupt")
    crc = _wire.crc32c(buf[pos:], crc)
    self._check_crc(entry, crc)
    pos += 4
    out = np.empty(n, dtype=object)
    for i, length in enumerate(lengths):
      out[i] = bytes(buf[pos : pos + length])
      pos += length
    return out.reshape(entry.shape)

  def _read_partitioned(self, entry: BundleEntry) -> np.ndarray:
    """Reassembles a tensor stored as slices (``GetSliceValue``), each under its own key."""
    if entry.dtype == DT_STRING:
      raise self._fail(entry.key, "partitioned string tensors are not supported")
    parts = []
    for extents in entry.slices:
      part = self._slices.get(_wire.encode_slice_key(entry.key, extents))
      if part is None:
        raise self._fail(entry.key, f"slice {list(extents)} has no entry in the index")
      shape = tuple(
        dim if length == -1 else length
        for (_, length), dim in zip(extents, entry.shape, strict=True)
      )
      if part.dtype != entry.dtype or part.shape != shape or part.slices:
        raise self._fail(
          entry.key,
          f"slice {list(extents)} is stored as dtype "
          f"{part.dtype} shape {part.shape}, expected dtype "
          f"{entry.dtype} shape {shape}",
        )
      parts.append((extents, part))
    # The stored slices (whose sizes were checked against the data files) must add up to
    # the tensor before its declared shape is allocated; overlaps and gaps are caught below.
    stored = sum(math.prod(part.shape) for _, part in parts)
    if stored != math.prod(entry.shape):
      raise self._fail(
        entry.key, f"its slices hold {stored} elements, the tensor {math.prod(entry.shape)}"
      )
    out = np.empty(entry.shape, dtype=_numpy_dtype(entry.dtype))
    covered = np.zeros(entry.shape, dtype=bool)
    for extents, part in parts:
      index = tuple(
        slice(0, dim) if length == -1 else slice(start, start + length)
        for (start, length), dim in zip(extents, entry.shape, strict=True)
      )
      if covered[index].any():
        raise self._fail(entry.key, f"slice {list(extents)} overlaps another slice")
      out[index] = self._read_value(dataclasses.replace(part, key=entry.key))
      covered[index] = True
    if not covered.all():
      raise self._fail(entry.key, "its slices do not cover the whole tensor")
    return out


def read_bundle(prefix: str | os.PathLike, *, verify_crc: bool = True) -> dict[str, np.ndarray]:
  """Every tensor of a TensorBundle, by key, as ``tf.train.load_checkpoint`` would return it.

  Args:
    prefix: The checkpoint prefix or its ``.index`` path.
    verify_crc: Check each tensor's CRC32C.

  Returns:
    Key to numpy array (little-endian, the stored dtype; strings as ``dtype=object`` arrays of
    ``bytes``). Partitioned tensors are reassembled; their slice entries are not listed.

  Raises:
    ConversionError: if the bundle is missing, malformed, corrupt or unsafe.
  """
  return BundleReader(prefix, verify_crc=verify_crc).read_all()
