"""The byte-level codecs a TensorFlow checkpoint is built from, in numpy and the standard library.

A TensorBundle (``_tensorbundle.py``) is a LevelDB-style table of serialized protobufs plus raw
tensor bytes, checksummed with masked CRC32C; sliced tensors are keyed with TF's OrderedCode.
This module decodes exactly those pieces and nothing more:

- :func:`crc32c` and :func:`mask_crc`: CRC-32C (Castagnoli) as ``tsl/lib/hash/crc32c.h`` computes
  it, and the rotation TF stores instead of the raw value.
- :func:`parse_message`: the protobuf wire format (varints, fixed32/64, length-delimited fields).
- :func:`read_table`: the table format of ``tsl/lib/io/table_format.txt`` (LevelDB's, without
  filter blocks).
- :func:`encode_slice_key`: ``checkpoint::EncodeTensorNameSlice`` from
  ``tensorflow/core/util/saved_tensor_slice_util.cc``.

Why by hand: no maintained, TensorFlow-free library reads these files (TensorFlow's own reader is
C++ behind ``tf.train.load_checkpoint``), and importing ``protobuf`` message classes for
TensorFlow's protos would mean importing TensorFlow. The pieces are small and fully specified.

Every decoding error raises :class:`WireFormatError`; the TensorBundle reader turns it into a
``ConversionError`` naming the file and the entry.
"""

from __future__ import annotations

import functools
import itertools
import struct

import numpy as np


class WireFormatError(ValueError):
  """Bytes that do not decode as the format says they should."""


# --------------------------------------------------------------------------------------------
# CRC-32C
# --------------------------------------------------------------------------------------------

# CRC-32C (Castagnoli), reflected polynomial, as in tsl/lib/hash/crc32c.h. Python's zlib.crc32
# is the IEEE polynomial, and the maintained CRC-32C wheels (google-crc32c, crc32c) are not
# dependencies of this project, so the checksum is computed here: a byte-at-a-time table for
# short inputs and a numpy version (below) for tensors.
_POLY = 0x82F63B78


def _make_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
  return table.astype(np.uint32)


_TABLE = _make_table()
_TABLE_LIST = _TABLE.tolist()
_VECTOR_MIN_BYTES = 4096


def _update_bytes(reg: int, data) -> int:
  """Feeds ``data`` through the CRC register one byte at a time (no pre/post inversion)."""
  table = _TABLE_LIST
  for byte in bytes(data):
    reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
  return reg


@functools.lru_cache(maxsize=16)
def _zeros_operator(length: int) -> tuple[list[int], ...]:
  """The register after ``length`` zero bytes, as four byte-indexed tables (it is linear)."""
  regs = (
    np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]
  ).ravel()
  for _ in range(length):
    regs = _TABLE[regs & 0xFF] ^ (regs >> 8)
  return tuple(regs.reshape(4, 256).tolist())


def _update_vectorized(reg: int, data: np.ndarray) -> int:
  """``_update_bytes`` for long inputs: many chunks at once with numpy, then combined.

  The register update is linear over GF(2) in (register, byte), so for a chunk C,
  ``f_C(r) = f_C(0) ^ Z_len(C)(r)`` where ``Z_n`` feeds n zero bytes. Every chunk's ``f_C(0)``
  is computed in parallel (one numpy step per byte position), then chained with ``Z_L``.
  """
  n = data.size
  # A chunk length near sqrt(n / 4) balances the numpy loop (L steps) against the Python
  # combine loop (n / L steps); powers of two keep the Z_L cache small.
  chunk = int(min(65536, max(256, 1 << int(np.log2(max(n, 1) / 4) / 2))))
  rows = n // chunk
  body = data[: rows * chunk].reshape(rows, chunk)
  regs = np.zeros(rows, dtype=np.uint32)
  for j in range(chunk):
    regs = _TABLE[(regs ^ body[:, j]) & 0xFF] ^ (regs >> 8)
  z0, z1, z2, z3 = _zeros_operator(chunk)
  for c in regs.tolist():
    reg = z0[reg & 0xFF] ^ z1[(reg >> 8) & 0xFF] ^ z2[(reg >> 16) & 0xFF] ^ z3[reg >> 24] ^ c
  return _update_bytes(reg, data[rows * chunk :].tobytes())


def crc32c(data, crc: int = 0) -> int:
  """CRC-32C of ``data``, extending ``crc`` (TF's ``crc32c::Extend``; ``crc32c::Value`` at 0).

  Args:
    data: Bytes-like object (``bytes``, ``bytearray``, ``memoryview``, uint8 array).
    crc: The CRC-32C of the bytes that precede ``data``.

  Returns:
    The CRC-32C of the preceding bytes followed by ``data``, as an unsigned 32-bit int.
  """
  reg = crc ^ 0xFFFFFFFF
  view = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
  view = view.reshape(-1).view(np.uint8)
  if view.size < _VECTOR_MIN_BYTES:
    reg = _update_bytes(reg, view.tobytes())
  else:
    reg = _update_vectorized(reg, view)
  return reg ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
  """TF's ``crc32c::Mask``: rotate right by 15 bits and add a constant (``tsl/lib/hash``).

  TF stores masked CRCs because a CRC of data that embeds CRCs is weak.
  """
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Protobuf wire format
# --------------------------------------------------------------------------------------------

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def read_varint(buf, pos: int) -> tuple[int, int]:
  """Decodes a base-128 varint at ``buf[pos]`` (at most 10 bytes); returns (value, next pos)."""
  result = 0
  for shift in range(0, 70, 7):
    if pos >= len(buf):
      raise WireFormatError("truncated varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      if result >= 1 << 64:
        raise WireFormatError("varint longer than 64 bits")
      return result, pos
  raise WireFormatError("varint longer than 10 bytes")


def to_signed64(value: int) -> int:
  """Reinterprets a decoded varint as int64 (how protobuf encodes negative int32/int64)."""
  return value - (1 << 64) if value >= 1 << 63 else value


def parse_message(buf) -> dict[int, list[tuple[int, int | bytes]]]:
  """Splits a serialized protobuf message into its fields.

  Args:
    buf: The serialized message.

  Returns:
    Field number to the list of ``(wire type, value)`` in file order: an int for varint and
    fixed fields, bytes for length-delimited ones. Protobuf's rule for a scalar field that
    occurs twice is "the last one wins"; :func:`scalar` applies it.

  Raises:
    WireFormatError: on truncation, field number 0, or the deprecated group wire types
      (none of the messages read here uses them).
  """
  buf = bytes(buf)
  fields: dict[int, list[tuple[int, int | bytes]]] = {}
  pos = 0
  while pos < len(buf):
    tag, pos = read_varint(buf, pos)
    number, wire = tag >> 3, tag & 7
    if number == 0:
      raise WireFormatError("field number 0")
    if wire == VARINT:
      value, pos = read_varint(buf, pos)
    elif wire in (FIXED64, FIXED32):
      width = 8 if wire == FIXED64 else 4
      if pos + width > len(buf):
        raise WireFormatError(f"truncated fixed{width * 8} field {number}")
      value = int.from_bytes(buf[pos : pos + width], "little")
      pos += width
    elif wire == LENGTH_DELIMITED:
      length, pos = read_varint(buf, pos)
      if pos + length > len(buf):
        raise WireFormatError(f"field {number} runs past the end of the message")
      value = buf[pos : pos + length]
      pos += length
    else:
      raise WireFormatError(f"unsupported wire type {wire} (field {number})")
    fields.setdefault(number, []).append((wire, value))
  return fields


def scalar(fields, number: int, wire: int, default=0):
  """The value of a non-repeated field (the last occurrence wins), checking its wire type."""
  values = repeated(fields, number, wire)
  return values[-1] if values else default


def repeated(fields, number: int, wire: int) -> list:
  """All values of a repeated field, checking their wire type.

  Packed repeated varints (proto3's default for ``repeated int32``) are unpacked.
  """
  out = []
  for got, value in fields.get(number, ()):
    if got == wire:
      out.append(value)
    elif wire == VARINT and got == LENGTH_DELIMITED:
      pos = 0
      while pos < len(value):
        item, pos = read_varint(value, pos)
        out.append(item)
    else:
      raise WireFormatError(f"field {number} has wire type {got}, expected {wire}")
  return out


# --------------------------------------------------------------------------------------------
# LevelDB-style table (tsl/lib/io/table_format.txt)
# --------------------------------------------------------------------------------------------

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # Two BlockHandles padded to 2 * 20 bytes, then the 8-byte magic.
_BLOCK_TRAILER_SIZE = 5  # 1-byte compression type + 4-byte masked CRC32C.


def _block_handle(buf, pos: int) -> tuple[int, int, int]:
  offset, pos = read_varint(buf, pos)
  size, pos = read_varint(buf, pos)
  return offset, size, pos


def _read_block(table: bytes, offset: int, size: int, what: str) -> bytes:
  end = offset + size + _BLOCK_TRAILER_SIZE
  if end > len(table) - FOOTER_SIZE:
    raise WireFormatError(
      f"{what} block [{offset}, {end}) lies past the end of the table "
      f"({len(table)} bytes): truncated file or corrupt block handle"
    )
  contents = table[offset : offset + size]
  compression = table[offset + size]
  (stored,) = struct.unpack_from("<I", table, offset + size + 1)
  # The CRC covers the contents and the compression-type byte (tsl/lib/io/format.cc).
  if mask_crc(crc32c(table[offset : offset + size + 1])) != stored:
    raise WireFormatError(f"{what} block at offset {offset}: CRC32C mismatch (corrupt file)")
  if compression != 0:
    # BundleWriter always writes kNoCompression (tensor_bundle.cc, TableBuilderOptions);
    # type 1 is Snappy, which this reader does not decode.
    kind = "Snappy-compressed" if compression == 1 else f"compression type {compression}"
    raise WireFormatError(
      f"{what} block at offset {offset} is {kind}; TensorBundle "
      "writers never compress, and compressed blocks are refused"
    )
  return contents


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
  """Decodes a block: prefix-compressed entries, then ``uint32 restarts[n]`` and ``uint32 n``."""
  if len(block) < 4:
    raise WireFormatError(f"{what} block too short for its restart count")
  (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
  limit = len(block) - 4 - 4 * num_restarts
  if num_restarts == 0 or limit < 0:
    raise WireFormatError(f"{what} block has an invalid restart count {num_restarts}")
  restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
  entries, starts, key, pos = [], {}, b"", 0
  while pos < limit:
    start = pos
    shared, pos = read_varint(block, pos)
    starts[start] = shared
    unshared, pos = read_varint(block, pos)
    value_len, pos = read_varint(block, pos)
    if shared > len(key) or pos + unshared + value_len > limit:
      raise WireFormatError(f"{what} block entry at {start} is corrupt")
    key = key[:shared] + block[pos : pos + unshared]
    pos += unshared
    entries.append((key, block[pos : pos + value_len]))
    pos += value_len
  # A restart point is an entry that stores its whole key (shared == 0), where a seeking
  # reader starts its binary search. This reader scans sequentially, so it only checks that
  # every restart point is such an entry (an empty block has the single restart point 0).
  valid = all(starts.get(r) == 0 for r in restarts) if entries else restarts == {0}
  if not valid:
    raise WireFormatError(f"{what} block has restart points that are not full-key entries")
  return entries


def read_table(table: bytes) -> list[tuple[bytes, bytes]]:
  """Every ``(key, value)`` of a LevelDB-style table, in key order.

  Args:
    table: The whole table file (a TensorBundle ``.index`` is small: one entry per tensor).

  Returns:
    The entries of all data blocks, in the order of the index block.

  Raises:
    WireFormatError: on a bad footer magic, out-of-range block handles, CRC mismatches,
      compressed blocks, malformed blocks, or keys out of order.
  """
  if len(table) < FOOTER_SIZE:
    raise WireFormatError(
      f"{len(table)} bytes is too short for a table footer ({FOOTER_SIZE} bytes): truncated file"
    )
  footer = table[-FOOTER_SIZE:]
  (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
  if magic != TABLE_MAGIC:
    raise WireFormatError(
      f"bad table magic {magic:#018x} (expected {TABLE_MAGIC:#018x}): "
      "not a TensorBundle index, or truncated"
    )
  _, _, pos = _block_handle(footer, 0)  # The metaindex block: TF writes no filters in it.
  index_offset, index_size, _ = _block_handle(footer, pos)
  entries = []
  for _, handle in _block_entries(_read_block(table, index_offset, index_size, "index"), "index"):
    offset, size, _ = _block_handle(handle, 0)
    entries.extend(_block_entries(_read_block(table, offset, size, "data"), "data"))
  for (a, _), (b, _) in itertools.pairwise(entries):
    if not a < b:
      raise WireFormatError(f"table keys out of order or duplicated: {a!r}, {b!r}")
  return entries


# --------------------------------------------------------------------------------------------
# OrderedCode slice keys (tensorflow/core/lib/strings/ordered_code.cc)
# --------------------------------------------------------------------------------------------


def _num_increasing(value: int) -> bytes:
  """``OrderedCode::WriteNumIncreasing``: a length byte, then the big-endian value."""
  body = value.to_bytes((value.bit_length() + 7) // 8, "big")
  return bytes([len(body)]) + body


def _signed_num_increasing(value: int) -> bytes:
  """``OrderedCode::WriteSignedNumIncreasing``: sign and length in the leading bits."""
  x = ~value if value < 0 else value
  if x < 64:
    return bytes([(0x80 ^ value) & 0xFF])
  length = x.bit_length() // 7 + 1  # kBitsToLength in ordered_code.cc.
  # The two's-complement value, sign-extended, in its last ``length`` bytes; then ``length``
  # leading header bits flipped (kLengthToHeaderBits: they spill into byte 2 from length 9).
  raw = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big")[-length:])
  if length <= 8:
    raw[0] ^= (0xFF << (8 - length)) & 0xFF
  else:
    raw[0] ^= 0xFF
    raw[1] ^= (0xFF << (16 - length)) & 0xFF
  return bytes(raw)


def encode_slice_key(name: str, extents: tuple[tuple[int, int], ...]) -> bytes:
  """The table key of one stored slice of ``name`` (``EncodeTensorNameSlice``).

  Args:
    name: The full tensor's key.
    extents: ``(start, length)`` per dimension; ``length == -1`` means the whole dimension
      (TF encodes a full extent as start 0, length -1).

  Returns:
    ``\\x00`` + the escaped name + ``\\x00\\x01`` + the rank + (start, length) per dimension.
  """
  escaped = name.encode().replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff")
  out = [_num_increasing(0), escaped, b"\x00\x01", _num_increasing(len(extents))]
  for start, length in extents:
    out.append(_signed_num_increasing(start))
    out.append(_signed_num_increasing(length))
  return b"".join(out)
