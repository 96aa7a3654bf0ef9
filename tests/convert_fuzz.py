"""Mutation fuzzer for the checkpoint converter: damaged and hostile files must be refused cleanly.

Seeds are real checkpoints written by Keras 3, tf-keras and TensorFlow (``fixtures_keras.py``,
``fixtures_tf.py``). Each mutant is a copy of one seed with one mutation: byte-level (bit flips,
interesting values, truncation, duplicated, deleted or inserted chunks) or structure-aware
(``config.json`` and other JSON edits, HDF5 dataset/attribute/link edits through h5py,
TensorBundle index entries and object-graph fields re-encoded with valid CRCs, zip headers and
members). Mutants are deterministic in ``(rng seed, mutant number)``.

Each mutant is checked in a child process forked from a server that imported the converter
once (:class:`ForkServer`). The child sets an address-space limit, then does what ``info`` and
``to-jax`` do: :func:`adamjax.convert.read`, the ``to-jax`` checks (``converted_tree``) and a
write back to Keras. The outcome is one of :data:`OUTCOMES`:

- ``accepted``: read and converted; ``refused``: a :class:`~adamjax.convert.ConversionError`
  with a short message;
- ``other``: anything else (another exception, an over-long message, a crash), with the type
  and the message; ``timeout``: killed at the wall-clock limit; ``memory``: ``MemoryError`` or
  killed for memory under the address-space limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import json
import os
import random
import select
import shutil
import signal
import struct
import time
import traceback
import zipfile
from pathlib import Path

OUTCOMES = ("accepted", "refused", "other", "timeout", "memory")
ADDRESS_SPACE_LIMIT = 4 << 30
MAX_MESSAGE_CHARS = 2000


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seed:
  """One real checkpoint: ``files`` (relative to ``root``) are copied; ``entry`` is read."""

  fmt: str
  root: Path
  files: tuple[str, ...]
  entry: str
  config_from: str | None = None  # A .keras whose config.json is passed as model_config.


def _files_under(root: Path, sub: str) -> tuple[str, ...]:
  base = root / sub
  if base.is_file():
    return (sub,)
  return tuple(sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()))


def seeds(keras_dir: Path, tf_dir: Path) -> dict[str, list[Seed]]:
  """The seed checkpoints per format, from the two fixture folders."""
  k, t = Path(keras_dir), Path(tf_dir)
  out: dict[str, list[Seed]] = {}

  def add(fmt: str, root: Path, sub: str, extra: tuple[str, ...] = (), config=None) -> None:
    if (root / sub).exists():
      files = _files_under(root, sub) + extra
      out.setdefault(fmt, []).append(Seed(fmt, root, files, sub, config))

  for stem in ("mlp", "cnn", "functional", "mlp_amsgrad", "mlp_schedule", "mlp_adamw"):
    add("keras", k, f"{stem}.keras")
  for stem in ("mlp", "functional", "mlp_schedule"):
    add("weights.h5", k, f"{stem}.weights.h5")
    add("weights.h5", k, f"{stem}.weights.h5", config=f"{stem}.keras")
  for stem in ("mlp", "cnn"):
    shards = tuple(sorted(p.name for p in k.glob(f"{stem}_0*.weights.h5")))
    add("weights.json", k, f"{stem}.weights.json", shards)
    add("weights.json", k, f"{stem}.weights.json", shards, config=f"{stem}.keras")
  for stem in ("tfk_mlp", "tfk_cnn", "tfk_mlp_legacy"):
    add("tf-keras-h5", k, f"{stem}.h5")
  for stem in ("mlp.ckpt", "cnn.ckpt", "mlp.sharded", "tfk_mlp.ckpt", "tfk_mlp_legacy.ckpt"):
    add("tf-checkpoint", t, stem)
  for stem in ("mlp.savedmodel", "mlp.export", "tfk_cnn.savedmodel"):
    add("savedmodel", t, stem)
  for stem in ("mlp.orbax", "mlp_amsgrad.orbax"):
    add("orbax-callback", t, stem)
  return out


# --------------------------------------------------------------------------------------------
# Byte-level mutations
# --------------------------------------------------------------------------------------------

_INTERESTING = (
  0,
  1,
  0x7F,
  0x80,
  0xFF,
  0x7FFF,
  0xFFFF,
  0x7FFFFFFF,
  0xFFFFFFFF,
  2**63 - 1,
  2**64 - 1,
)


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """One byte-level mutation of ``data``."""
  b = bytearray(data)
  n = len(b)
  if n == 0:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "random bytes"
  op = rng.choice(("flip", "flip", "byte", "int", "truncate", "duplicate", "delete", "insert"))
  if op == "flip":
    k = rng.choice((1, 1, 2, 4, 8, 32))
    for _ in range(k):
      i = rng.randrange(n)
      b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flip {k} bits"
  if op == "byte":
    i = rng.randrange(n)
    b[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
    return bytes(b), f"byte {i}"
  if op == "int":
    width = rng.choice((2, 4, 8))
    i = rng.randrange(max(n - width, 1))
    value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
    b[i : i + width] = value.to_bytes(width, rng.choice(("little", "big")))
    return bytes(b[:n]), f"int{8 * width} at {i}"
  if op == "truncate":
    cut = rng.randrange(n)
    return bytes(b[:cut]), f"truncate to {cut}"
  start = rng.randrange(n)
  length = min(rng.choice((1, 4, 16, 256, 4096, 65536)), n - start)
  if op == "duplicate":
    at = rng.randrange(n)
    return bytes(b[:at] + b[start : start + length] + b[at:]), f"duplicate {length} bytes"
  if op == "delete":
    return bytes(b[:start] + b[start + length :]), f"delete {length} bytes"
  junk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 8, 64))))
  return bytes(b[:start] + junk + b[start:]), f"insert {len(junk)} bytes"


# --------------------------------------------------------------------------------------------
# JSON mutations
# --------------------------------------------------------------------------------------------


_DEEP = "__deeply_nested__"  # Replaced by 5000 nested lists when the JSON is written.


def _hostile_values(rng: random.Random) -> list:
  return [
    None,
    True,
    0,
    -1,
    2**63,
    10**400,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    -0.5,
    "",
    "x",
    "\udcff\x00",
    "relu",
    "A" * rng.choice((200, 1 << 20)),
    [],
    [1, 2],
    {},
    {"class_name": "Lambda", "config": {"function": "os.system"}},
    {"module": "os", "class_name": "system", "config": {}},
    _DEEP,
    "float64",
    "bfloat16",
    [None, 3],
    [-1, 2**40],
  ]


def _nodes(value, path=()):
  yield path, value
  if isinstance(value, dict):
    for k, v in value.items():
      yield from _nodes(v, (*path, k))
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _nodes(v, (*path, i))


def mutate_json(value, rng: random.Random) -> tuple[object, str]:
  """One structural edit of a JSON document (returned as new data; ``value`` is copied)."""
  value = json.loads(json.dumps(value))
  nodes = list(_nodes(value))
  path, node = rng.choice(nodes)
  if not path:
    return rng.choice(_hostile_values(rng)), "replace the document"
  parent = value
  for key in path[:-1]:
    parent = parent[key]
  key = path[-1]
  op = rng.choice(("replace", "replace", "replace", "delete", "duplicate", "rename", "retype"))
  if op == "replace":
    parent[key] = rng.choice(_hostile_values(rng))
  elif op == "delete":
    del parent[key]
  elif op == "duplicate" and isinstance(parent, list):
    parent.insert(key, json.loads(json.dumps(node)))
  elif op == "rename" and isinstance(parent, dict):
    parent[rng.choice(("class_name", "name", "config", "layers", "x" * 300, ""))] = parent.pop(key)
  elif isinstance(node, str):
    parent[key] = rng.choice(
      ("Dense", "Conv2D", "BatchNormalization", "Sequential", "Functional", "Adam", "AdamW", "SGD")
    )
  elif isinstance(node, (int, float)) and not isinstance(node, bool):
    parent[key] = rng.choice((node + 1, -node, node * 1000, str(node), [node]))
  else:
    parent[key] = rng.choice(_hostile_values(rng))
  return value, f"json {op} at {'/'.join(map(str, path))[:80]}"


def _dump_json(value) -> bytes:
  text = json.dumps(value).replace(f'"{_DEEP}"', "[" * 5000 + "]" * 5000)
  return text.encode("utf-8", "surrogatepass")


def mutate_json_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  try:
    doc = json.loads(data)
  except ValueError:
    return mutate_bytes(data, rng)
  new, what = mutate_json(doc, rng)
  return _dump_json(new), what


# --------------------------------------------------------------------------------------------
# HDF5 mutations (through h5py)
# --------------------------------------------------------------------------------------------


def _h5_objects(f):
  import h5py

  groups, datasets = [], []

  def visit(name, obj):
    (datasets if isinstance(obj, h5py.Dataset) else groups).append(name)

  f.visititems(visit)
  return groups, datasets


def mutate_h5_file(path: Path, rng: random.Random) -> str:
  """One structural edit of the HDF5 file at ``path``, in place."""
  import h5py
  import numpy as np

  with h5py.File(path, "r+") as f:
    groups, datasets = _h5_objects(f)
    op = rng.choice(
      (
        "dataset",
        "dataset",
        "dataset",
        "attr",
        "attr",
        "json_attr",
        "delete",
        "move",
        "link",
        "add",
        "compressed",
      )
    )
    if op == "dataset" and datasets:
      name = rng.choice(datasets)
      old = f[name][()]
      old = np.asarray(old)
      choice = rng.randrange(9)
      if choice == 0:
        new = old.astype(old.dtype.newbyteorder(">"))
      elif choice == 1:
        new = old.astype(rng.choice(("f2", "f8", "i4", "i8", "u1", "?", "c8")))
      elif choice == 2:
        new = np.zeros((0,) + old.shape[1:], old.dtype)
      elif choice == 3:
        new = old.reshape(-1) if old.ndim else np.zeros((2,), old.dtype)
      elif choice == 4:
        new = np.asarray(rng.choice((np.inf, np.nan, -1, 2**62, 1e30)), old.dtype)
      elif choice == 5:
        new = np.asarray(old).T.copy() if old.ndim > 1 else np.zeros((3, 3), old.dtype)
      elif choice == 6:
        new = np.array([b"abc", b"\xff\xfe"], dtype="S4")
      elif choice == 7:
        del f[name]
        f.create_dataset(name, data=np.array(["x", "y"], dtype=h5py.string_dtype()))
        return f"h5 {name}: variable-length strings"
      else:
        new = np.full(old.shape, np.nan, old.dtype) if old.dtype.kind == "f" else old + 1
      del f[name]
      f[name] = new
      return f"h5 {name}: {new.dtype}{new.shape}"
    if op == "attr" and (groups or datasets):
      name = rng.choice(groups + datasets + [""])
      obj = f[name] if name else f
      attrs = list(obj.attrs) or ["name"]
      attr = rng.choice(attrs + ["name"])
      value = rng.choice(
        (
          np.bytes_(b"\xff\xfe\x80abc"),
          "A" * rng.choice((300, 1 << 21)),
          7,
          np.array([1.5, 2.5]),
          np.array([b"dense", b"\xff"], dtype="S5"),
          np.array([], dtype="S1"),
          "",
          "../../etc",
          np.array(["a", "b"], dtype=h5py.string_dtype()),
        )
      )
      obj.attrs[attr] = value
      return f"h5 attr {name}@{attr}"
    if op == "json_attr":
      for name in ("model_config", "training_config"):
        if name in f.attrs:
          raw = f.attrs[name]
          raw = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
          new, what = mutate_json(json.loads(raw), rng)
          f.attrs[name] = _dump_json(new)
          return f"h5 attr {name}: {what}"
      op = "delete"
    if op == "delete" and (groups or datasets):
      name = rng.choice(groups + datasets)
      del f[name]
      return f"h5 delete {name}"
    if op == "move" and datasets:
      a = rng.choice(datasets)
      parent = a.rpartition("/")[0]
      target = f"{parent}/{rng.choice(('99', '00', '-1', 'x', '3', '1000000000'))}"
      if target not in f:
        f.move(a, target)
        return f"h5 move {a} -> {target}"
      return "h5 move (no-op)"
    if op == "link" and (groups or datasets):
      src = rng.choice(groups + datasets)
      kind = rng.randrange(3)
      target = f"{src}_link"
      if kind == 0:
        f[target] = f[src]
      elif kind == 1:
        f[target] = h5py.SoftLink("/" + src)
      else:
        f[target] = h5py.ExternalLink("/etc/passwd", "/x")
      return f"h5 link kind {kind} to {src}"
    if op == "add" and groups:
      parent = rng.choice(groups)
      name = f"{parent}/{rng.choice(('0', '1', '2', '5', '17', 'kernel'))}_new"
      if rng.random() < 0.5:
        name = f"{parent}/{len(f[parent])}"
      if name not in f:
        f[name] = np.zeros(rng.choice(((), (3,), (784, 128), (10,))), "f4")
      return f"h5 add {name}"
    if op == "compressed" and datasets:
      # A gzip dataset of 256 MiB to 1 GiB that stores about 1/80 of that: under a
      # 1000x compression-ratio cap, so only a decoded-bytes budget or reading after the
      # cross-checks keeps it out of memory.
      name = rng.choice(datasets)
      del f[name]
      rows = rng.choice((1 << 8, 1 << 10))
      ds = f.create_dataset(
        name, shape=(rows, 1 << 18), dtype="f4", chunks=(1, 1 << 18), compression="gzip"
      )
      noise = np.random.default_rng(rng.randrange(1 << 30)).random((1, 1 << 18), "f4")
      for r in range(0, rows, 80):
        ds[r : r + 1] = noise
      return f"h5 compressed {name}({rows}, {1 << 18})"
  return "h5 no-op"


# --------------------------------------------------------------------------------------------
# Zip (.keras) mutations
# --------------------------------------------------------------------------------------------


def _rewrite_zip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as z:
    for info, data in members:
      z.writestr(info, data)
  return out.getvalue()


def mutate_zip(data: bytes, rng: random.Random, workdir: Path) -> tuple[bytes, str]:
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    members = [(info, z.read(info)) for info in z.infolist()]
  op = rng.choice(("config", "config", "config", "h5", "h5", "header", "member", "metadata"))
  names = [info.filename for info, _ in members]
  if op in ("config", "metadata"):
    name = "config.json" if op == "config" else "metadata.json"
    if name in names:
      i = names.index(name)
      new, what = mutate_json_bytes(members[i][1], rng)
      members[i] = (members[i][0], new)
      return _rewrite_zip(members), f"zip {name}: {what}"
  if op == "h5" and "model.weights.h5" in names:
    i = names.index("model.weights.h5")
    tmp = workdir / "inner.h5"
    tmp.write_bytes(members[i][1])
    what = mutate_h5_file(tmp, rng)
    members[i] = (members[i][0], tmp.read_bytes())
    tmp.unlink()
    return _rewrite_zip(members), f"zip model.weights.h5: {what}"
  if op == "member":
    kind = rng.randrange(6)
    if kind == 0:
      members.pop(rng.randrange(len(members)))
      return _rewrite_zip(members), "zip drop member"
    if kind == 1:
      name = rng.choice(("../evil", "/abs", "assets/x", "a\\b", "extra.txt", "config.json/"))
      members.append((zipfile.ZipInfo(name), b"x"))
      return _rewrite_zip(members), f"zip add member {name!r}"
    if kind == 2:
      members.append(members[rng.randrange(len(members))])
      return _rewrite_zip(members), "zip duplicate member"
    if kind == 3:
      # A deflated member that declares far more than it inflates to, or a real bomb.
      i = rng.randrange(len(members))
      info = members[i][0]
      info.compress_type = zipfile.ZIP_DEFLATED
      body = b"\0" * rng.choice((1 << 20, 64 << 20))
      raw = _rewrite_zip([(info, body)])
      members[i] = (info, body)
      del raw
      return _rewrite_zip(members), f"zip deflated {len(body)} zero bytes as {info.filename}"
    if kind == 4:
      i = rng.randrange(len(members))
      info = members[i][0]
      info.flag_bits |= rng.choice((0x1, 0x8, 0x40, 0x800))
      return _rewrite_zip(members), f"zip flag bits on {info.filename}"
    i = rng.randrange(len(members))
    info = members[i][0]
    info.compress_type = rng.choice((zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA))
    return _rewrite_zip(members), f"zip compression {info.compress_type} on {info.filename}"
  if op == "header":
    return _mutate_zip_header(data, rng)
  return mutate_bytes(data, rng)


def _mutate_zip_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """Overwrites one field of a local or central-directory header (or the end record)."""
  b = bytearray(data)
  sigs = {b"PK\x03\x04": "local", b"PK\x01\x02": "central", b"PK\x05\x06": "end"}
  spots = [(i, kind) for sig, kind in sigs.items() for i in _find_all(b, sig)]
  if not spots:
    return mutate_bytes(data, rng)
  at, kind = rng.choice(spots)
  fields = {
    # (offset, width) of each field after the signature.
    "local": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    "central": [(4, 2), (6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (42, 4)],
    "end": [(4, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
  }[kind]
  off, width = rng.choice(fields)
  value = rng.choice((0, 1, 20, 45, 63, 99, 0xFFFF, 0xFFFFFFFF, 3 << 30, 12345)) & (
    (1 << (8 * width)) - 1
  )
  struct.pack_into("<H" if width == 2 else "<I", b, at + off, value)
  return bytes(b), f"zip {kind} header field +{off} = {value}"


def _find_all(b: bytes, sig: bytes):
  i = b.find(sig)
  while i != -1:
    yield i
    i = b.find(sig, i + 1)


# --------------------------------------------------------------------------------------------
# TensorBundle mutations
# --------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def varint_field(number: int, value: int) -> bytes:
  """A varint field; appended to a message it overrides the earlier value (last one wins)."""
  return varint(number << 3) + varint(value)


def bytes_field(number: int, value: bytes) -> bytes:
  return varint((number << 3) | 2) + varint(len(value)) + value


def write_table(items, compression: int = 0) -> bytes:
  """A minimal LevelDB-style table (one data block): a TensorBundle index, CRCs valid."""
  from adamjax.convert import _wire

  out = bytearray()

  def block(entries) -> bytes:
    body, restarts = bytearray(), []
    for key, value in entries:
      restarts.append(len(body))
      body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    restarts = restarts or [0]
    return (
      bytes(body) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    )

  def emit(contents: bytes) -> bytes:
    offset = len(out)
    trailer = bytes([compression])
    out.extend(
      contents + trailer + struct.pack("<I", _wire.mask_crc(_wire.crc32c(contents + trailer)))
    )
    return varint(offset) + varint(len(contents))

  data = emit(block(items))
  meta = emit(block([]))
  index = emit(block([(items[-1][0], data)]))
  out.extend((meta + index).ljust(40, b"\0") + struct.pack("<Q", _wire.TABLE_MAGIC))
  return bytes(out)


def _string_tensor(value: bytes) -> tuple[bytes, int]:
  """A one-element DT_STRING tensor's bytes and masked CRC (tensor_bundle.cc WriteStringTensor)."""
  from adamjax.convert import _wire

  length = len(value).to_bytes(4, "little")
  crc = _wire.crc32c(length)
  body = varint(len(value)) + struct.pack("<I", _wire.mask_crc(crc)) + value
  crc = _wire.crc32c(body[len(varint(len(value))) :], crc)
  return body, _wire.mask_crc(crc)


def _mutate_proto(data: bytes, rng: random.Random, depth: int = 0) -> bytes:
  """Rewrites one field of a protobuf message (recursing into sub-messages)."""
  from adamjax.convert import _wire

  try:
    fields = _wire.parse_message(data)
  except Exception:  # noqa: BLE001 - not a message: mutate the bytes
    return mutate_bytes(data, rng)[0]
  flat = [(n, w, v) for n, items in fields.items() for w, v in items]
  if not flat:
    return data + varint_field(rng.randrange(1, 8), rng.choice(_INTERESTING))
  n, w, v = rng.choice(flat)
  out = bytearray()
  replaced = False
  for number, items in fields.items():
    for wire, value in items:
      if not replaced and (number, wire, value) == (n, w, v):
        replaced = True
        r = rng.random()
        if r < 0.15:
          continue  # drop the field
        if wire == 0:
          out += varint_field(number, rng.choice((*_INTERESTING, value + 1, 10**6, 2**31)))
          continue
        if wire == 2 and r < 0.6 and depth < 4:
          out += bytes_field(number, _mutate_proto(value, rng, depth + 1))
          continue
        if wire == 2 and r < 0.8:
          out += bytes_field(number, value) * rng.choice((2, 100))
          continue
      out += _encode_field(number, wire, value)
  return bytes(out)


def _encode_field(number: int, wire: int, value) -> bytes:
  if wire == 0:
    return varint_field(number, value)
  if wire == 2:
    return bytes_field(number, value)
  if wire == 5:
    return varint((number << 3) | 5) + struct.pack("<I", value)
  return varint((number << 3) | 1) + struct.pack("<Q", value)


def mutate_bundle(prefix: Path, rng: random.Random) -> str:
  """A structural edit of a TensorBundle (index entries re-encoded with valid CRCs)."""
  from adamjax.convert import _wire

  index = prefix.with_name(prefix.name + ".index")
  items = _wire.read_table(index.read_bytes())
  op = rng.choice(("entry", "entry", "entry", "graph", "graph", "header", "slices", "drop", "key"))
  if op == "graph":
    keys = [k for k, _ in items]
    key = b"_CHECKPOINTABLE_OBJECT_GRAPH"
    if key in keys:
      from adamjax.convert import _tensorbundle

      reader = _tensorbundle.BundleReader(prefix)
      graph = bytes(reader.read(key.decode()).reshape(-1)[0])
      new = _mutate_proto(graph, rng)
      body, crc = _string_tensor(new)
      i = keys.index(key)
      data = prefix.with_name(f"{prefix.name}.data-00000-of-{reader.header.num_shards:05d}")
      offset = data.stat().st_size
      with open(data, "ab") as f:
        f.write(body)
      entry = items[i][1] + varint_field(3, 0) + varint_field(4, offset)
      entry += varint_field(5, len(body)) + varint((6 << 3) | 5) + struct.pack("<I", crc)
      items[i] = (key, entry)
      index.write_bytes(write_table(items))
      return "bundle object graph field"
    op = "entry"
  if op == "header":
    items[0] = (b"", _mutate_proto(items[0][1], rng))
  elif op == "entry":
    i = rng.randrange(1, len(items))
    key, value = items[i]
    if rng.random() < 0.5:
      field = rng.choice((1, 3, 4, 5, 6))
      value += varint_field(field, rng.choice((*_INTERESTING, 2, 7, 14, 19, 20, 21, 24, 100)))
    else:
      value = _mutate_proto(value, rng)
    items[i] = (key, value)
  elif op == "slices":
    _slice_bomb(items, rng)
  elif op == "drop":
    items.pop(rng.randrange(1, len(items)))
  else:
    i = rng.randrange(1, len(items))
    new_key = rng.choice((b"\xff\xfe", b"\x00abc", b"a" * 5000, items[i][0] + b"\x00"))
    items[i] = (new_key, items[i][1])
    items.sort(key=lambda kv: kv[0])
    dedup = []
    for kv in items:
      if not dedup or dedup[-1][0] != kv[0]:
        dedup.append(kv)
    items = dedup
  index.write_bytes(write_table(items))
  return f"bundle {op}"


def _slice_bomb(items: list, rng: random.Random) -> None:
  """Makes one stored float tensor a partitioned one of N slices that all point at its bytes."""
  from adamjax.convert import _wire

  candidates = []
  for key, value in items:
    if not key or key.startswith(b"\x00"):
      continue
    fields = _wire.parse_message(value)
    dims = _wire.repeated(_wire.parse_message(_wire.scalar(fields, 2, 2, b"")), 2, 2)
    if _wire.scalar(fields, 1, 0) == 1 and dims and _wire.scalar(fields, 5, 0) > 0:
      candidates.append(key)
  if candidates:
    slice_bomb(items, rng.choice(candidates), rng.choice((2, 1000, 10000)))


def slice_bomb(items: list, key: bytes, n: int) -> None:
  """Index ``items`` edited so tensor ``key`` is ``n`` slices along dimension 0, every slice
  entry a copy of the tensor's own entry (the same bytes), as in a 2.7 MB bundle that once
  decoded to a 4.5 GiB allocation."""
  from adamjax.convert import _wire

  i = [k for k, _ in items].index(key)
  value = items[i][1]
  fields = _wire.parse_message(value)
  dims = [
    _wire.scalar(_wire.parse_message(d), 1, 0)
    for d in _wire.repeated(_wire.parse_message(_wire.scalar(fields, 2, 2, b"")), 2, 2)
  ]
  whole = [dims[0] * n, *dims[1:]]
  shape = b"".join(bytes_field(2, varint_field(1, d)) for d in whole)
  slices, extra = b"", []
  for s in range(n):
    extents = ((s * dims[0], dims[0]), *((0, -1) for _ in dims[1:]))
    message = bytes_field(1, varint_field(1, s * dims[0]) + varint_field(2, dims[0]))
    message += bytes_field(1, b"") * (len(dims) - 1)
    slices += bytes_field(7, message)
    extra.append((_wire.encode_slice_key(key.decode(), extents), value))
  items[i] = (key, varint_field(1, 1) + bytes_field(2, shape) + slices)
  items.extend(extra)
  items.sort(key=lambda kv: kv[0])


_STATE_PATHS = (
  "ckpt-1\x00",
  "../../etc/passwd",
  "\\777\\x00",
  "a" * 100_000,
  "\udcff",
  "ckpt-99",
  "",
  '\\"',
)


def mutate_checkpoint_state(path: Path, rng: random.Random) -> str:
  name = rng.choice(_STATE_PATHS)
  text = f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n'
  path.write_bytes(text.encode("utf-8", "surrogatepass"))
  return f"checkpoint state path {name[:20]!r}"


# --------------------------------------------------------------------------------------------
# Mutant construction
# --------------------------------------------------------------------------------------------


def make_mutant(seed: Seed, rng: random.Random, workdir: Path) -> tuple[Path, str]:
  """Copies ``seed`` into ``workdir`` (hard links where untouched), mutates one file.

  Returns:
    The path to read and a description of the mutation.
  """
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  for rel in seed.files:
    target = workdir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(seed.root / rel, target)
  entry = workdir / seed.entry
  victim, what = _choose_victim(seed, rng, workdir)
  data = victim.read_bytes()
  victim.unlink()  # Break the hard link before writing.
  victim.write_bytes(data)
  description = _mutate_file(seed, victim, data, rng, workdir)
  return entry, f"{seed.entry} {what}: {description}"


def _choose_victim(seed: Seed, rng: random.Random, workdir: Path) -> tuple[Path, str]:
  files = list(seed.files)
  if seed.fmt in ("tf-checkpoint", "savedmodel"):
    weights = [
      5 if f.endswith(".index") else 2 if "checkpoint" in f.rpartition("/")[2] else 1 for f in files
    ]
    files = [f for f, w in zip(files, weights, strict=True) for _ in range(w)]
  elif seed.fmt == "weights.json":
    files = [seed.entry] * len(files) + files
  rel = rng.choice(files)
  return workdir / rel, rel


def _mutate_file(seed: Seed, victim: Path, data: bytes, rng: random.Random, workdir: Path) -> str:
  name = victim.name
  structural = rng.random() < 0.7
  if structural:
    if name.endswith(".keras"):
      new, what = mutate_zip(data, rng, workdir)
      victim.write_bytes(new)
      return what
    if name.endswith(".h5"):
      try:
        return mutate_h5_file(victim, rng)
      except (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError) as e:
        return f"h5 edit failed ({type(e).__name__})"
    if name.endswith(".index"):
      return mutate_bundle(victim.with_name(name.removesuffix(".index")), rng)
    if name == "checkpoint":
      return mutate_checkpoint_state(victim, rng)
    if name.endswith(".json") or name in ("_CHECKPOINT_METADATA", "_METADATA"):
      new, what = mutate_json_bytes(data, rng)
      victim.write_bytes(new)
      return what
  new, what = mutate_bytes(data, rng)
  victim.write_bytes(new)
  return what


def mutants(all_seeds: dict[str, list[Seed]], count: int, rng_seed: int):
  """``count`` (fmt, seed, per-mutant rng) triples, formats taken in turn."""
  formats = sorted(all_seeds)
  for i in range(count):
    fmt = formats[i % len(formats)]
    rng = random.Random(f"{rng_seed}/{i}")
    yield i, fmt, rng.choice(all_seeds[fmt]), rng


# --------------------------------------------------------------------------------------------
# The check each child runs
# --------------------------------------------------------------------------------------------


def check(path: Path, out_dir: Path, model_config: dict | None = None) -> str:
  """What ``info`` and ``to-jax`` do with a file, the model built from its config
  (``flax_model``), and a write back to Keras; returns a note."""
  from adamjax import convert
  from adamjax.convert import __main__ as cli
  from adamjax.convert import _orbax

  ckpt = convert.read(path, model_config=model_config)
  cli._describe(ckpt)
  if ckpt.optimizer is None:
    _orbax.check_values(ckpt)
    _orbax.flax_variables(ckpt)
  else:
    _orbax.converted_tree(ckpt)
  if ckpt.model_config is not None or model_config is not None:
    convert.flax_model(ckpt, model_config=model_config)  # built and traced on its inputs
  convert.write(ckpt, out_dir / "out.weights.h5")
  if ckpt.format == "keras":
    convert.write(ckpt, out_dir / "out.keras")
  return ckpt.format


@dataclasses.dataclass
class Outcome:
  index: int
  fmt: str
  mutation: str
  outcome: str
  detail: str = ""
  seconds: float = 0.0
  maxrss_kb: int = 0


def seed_config(seed: Seed) -> dict | None:
  """The model config a seed is read with (its sibling ``.keras``'s), or None."""
  if seed.config_from is None:
    return None
  with zipfile.ZipFile(seed.root / seed.config_from) as z:
    return json.loads(z.read("config.json"))


def _child(path: Path, out_dir: Path, write_fd: int, model_config: dict | None) -> None:
  import resource

  # pytest's faulthandler would dump the server's stacks to the terminal if a child crashed;
  # the parent records the crash (signal) as the outcome instead.
  faulthandler.disable()
  resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  from adamjax.convert import ConversionError

  try:
    check(path, out_dir, model_config)
    result = {"outcome": "accepted"}
  except ConversionError as e:
    message = str(e)
    if len(message) > MAX_MESSAGE_CHARS:
      result = {"outcome": "other", "detail": f"message of {len(message)} chars: {message[:300]}"}
    else:
      result = {"outcome": "refused", "detail": message[:300]}
  except MemoryError:
    result = {"outcome": "memory", "detail": traceback.format_exc(limit=-3)[-600:]}
  except BaseException as e:  # noqa: BLE001 - the point: report anything that escaped
    tb = traceback.extract_tb(e.__traceback__)
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb[-3:])
    result = {"outcome": "other", "detail": f"{type(e).__name__}: {str(e)[:200]!r} at {where}"}
  os.write(write_fd, json.dumps(result).encode()[:60000])
  os._exit(0)


def warm_imports() -> None:
  """Imports everything the check uses, once, in the fork server (not JAX's backend)."""
  import h5py  # noqa: F401
  import numpy  # noqa: F401
  import orbax.checkpoint  # noqa: F401

  import adamjax.convert  # noqa: F401
  import adamjax.convert.__main__  # noqa: F401
  from adamjax.convert import _keras_h5, _orbax, _tf_checkpoint  # noqa: F401


def run_one(
  path: Path, out_dir: Path, timeout: float, model_config: dict | None = None
) -> tuple[dict, float, int]:
  """Forks a child to check ``path``; returns (result, seconds, child's peak RSS in kB)."""
  read_fd, write_fd = os.pipe()
  start = time.monotonic()
  pid = os.fork()
  if pid == 0:
    os.close(read_fd)
    try:
      _child(path, out_dir, write_fd, model_config)
    finally:
      os._exit(70)
  os.close(write_fd)
  chunks = []
  timed_out = False
  deadline = start + timeout
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      timed_out = True
      break
    ready, _, _ = select.select([read_fd], [], [], left)
    if ready:
      chunk = os.read(read_fd, 65536)
      if not chunk:
        break
      chunks.append(chunk)
  if timed_out:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
  os.close(read_fd)
  _, status, usage = os.wait4(pid, 0)
  seconds = time.monotonic() - start
  if timed_out:
    return {"outcome": "timeout", "detail": f"over {timeout} s"}, seconds, usage.ru_maxrss
  raw = b"".join(chunks)
  if not raw:
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    kind = "memory" if sig in (signal.SIGKILL, signal.SIGABRT) else "other"
    return (
      {"outcome": kind, "detail": f"child died (status {status}, signal {sig})"},
      seconds,
      usage.ru_maxrss,
    )
  return json.loads(raw), seconds, usage.ru_maxrss


def fuzz(
  all_seeds: dict[str, list[Seed]],
  count: int,
  rng_seed: int,
  workdir: Path,
  *,
  timeout: float = 60.0,
  progress=None,
  shard: tuple[int, int] = (0, 1),
  indices: set[int] | None = None,
):
  """Runs ``count`` mutants one at a time; yields an :class:`Outcome` per mutant.

  ``shard=(k, n)`` runs only mutants ``i`` with ``i % n == k`` (for parallel fork servers).
  """
  warm_imports()
  for i, fmt, seed, rng in mutants(all_seeds, count, rng_seed):
    if i % shard[1] != shard[0] or (indices is not None and i not in indices):
      continue
    mutant_dir = workdir / "mutant"
    try:
      path, mutation = make_mutant(seed, rng, mutant_dir)
    except Exception as e:  # noqa: BLE001 - a mutator bug is not the converter's
      yield Outcome(i, fmt, "mutation failed", "skipped", f"{type(e).__name__}: {e}"[:300])
      continue
    out_dir = workdir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    result, seconds, rss = run_one(path, out_dir, timeout, seed_config(seed))
    outcome = Outcome(i, fmt, mutation, result["outcome"], result.get("detail", ""), seconds, rss)
    if progress is not None:
      progress(outcome)
    yield outcome
  shutil.rmtree(workdir / "mutant", ignore_errors=True)
  shutil.rmtree(workdir / "out", ignore_errors=True)


def table(outcomes: list[Outcome]) -> str:
  """A Markdown table per format: mutants run and each outcome, worst peak RSS and time."""
  rows = ["| format | run | " + " | ".join(OUTCOMES) + " | worst peak RSS (MiB) | slowest (s) |"]
  rows.append("|" + "---|" * (len(OUTCOMES) + 4))
  by_fmt: dict[str, list[Outcome]] = {}
  for o in outcomes:
    by_fmt.setdefault(o.fmt, []).append(o)
  for fmt in [*sorted(by_fmt), "all"]:
    group = outcomes if fmt == "all" else by_fmt[fmt]
    counts = [sum(o.outcome == k for o in group) for k in OUTCOMES]
    rss = max((o.maxrss_kb for o in group), default=0) / 1024
    slow = max((o.seconds for o in group), default=0.0)
    rows.append(
      f"| {fmt} | {len(group)} | " + " | ".join(map(str, counts)) + f" | {rss:.0f} | {slow:.1f} |"
    )
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
  """``python convert_fuzz.py KERAS_DIR TF_DIR --seed S --mutants N``: one fork server.

  Prints one JSON outcome per line. The test suite runs this in a fresh process: a server must
  fork before anything starts threads (a pytest process that already ran JAX or TensorFlow
  holds locks that a forked child would wait on forever). ``--mutants 0`` checks the
  unmutated seeds instead.
  """
  import argparse
  import sys
  import tempfile

  parser = argparse.ArgumentParser()
  parser.add_argument("keras_dir", type=Path)
  parser.add_argument("tf_dir", type=Path)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--mutants", type=int, default=100)
  parser.add_argument("--timeout", type=float, default=60.0)
  args = parser.parse_args(argv)
  all_seeds = seeds(args.keras_dir, args.tf_dir)
  with tempfile.TemporaryDirectory(prefix="adamjax_fuzz_") as work:
    if args.mutants == 0:
      warm_imports()
      for fmt, group in all_seeds.items():
        for s in group:
          result, seconds, rss = run_one(s.root / s.entry, Path(work), args.timeout, seed_config(s))
          o = Outcome(-1, fmt, f"seed {s.entry}", result["outcome"], result.get("detail", ""))
          print(json.dumps(dataclasses.asdict(o)), flush=True)
      return
    for o in fuzz(all_seeds, args.mutants, args.seed, Path(work), timeout=args.timeout):
      print(json.dumps(dataclasses.asdict(o)), flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
