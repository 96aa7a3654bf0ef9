"""Flat-resident parameters: a few flat buffers per dtype, so Adam stops paying per leaf.

Adam reads params, grads and both moments and writes params and moments: 28 bytes per float32
parameter and a few flops. On XLA:CPU every leaf of a parameter tree becomes its own fused
kernel, compiled on its own: `optax.adam` on 10M parameters in 1,000 leaves of mixed sizes took
4.2x its one-leaf step and 15 s to compile (`benchmarks/results/adam_step_cpu.md`).
`optax.flatten` removes the kernels but concatenates params and grads and splits the updates on
every step (4-5.5x the copy of the same bytes there), and promotes mixed dtypes to one.

:class:`FlatLayout` keeps the parameters *resident* in flat 1-D buffers, one per dtype (split
at 4 MiB on CPU, and optionally by group): the training loop holds `{"float32": f32[N], ...}`,
the model reads its leaves through :meth:`FlatLayout.unravel` (static slices that XLA fuses
into their consumers; their gradient is a concatenation per buffer), and the optimizer sees a
handful of leaves whatever the tree. Every adamjax preset acts element by element, so on these
buffers it computes, element for element, the operations it computes per leaf: the results are
bit-identical (tested for every preset). In the same benchmark the flat step took 1.13x its
one-leaf time at 1,000 mixed leaves (0.27x optax's time there) and compiled in 0.1-0.5 s.
:meth:`FlatLayout.optimizer` runs a built transformation on the buffers and refuses what is not
elementwise (Keras's per-tensor `clipnorm`, the cross-tensor `global_clipnorm`, any reduction)
rather than silently computing it over a whole buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax

from adamjax import _common, _keras_weight_decay

__all__ = ["FlatLayout"]

# On CPU a step that is not donated writes fresh output buffers. glibc serves allocations above
# its mmap threshold (at most 32 MiB) with fresh pages, so a 40 MB buffer page-faults on every
# step: Adam on 10M float32 parameters took 36.9 ms/step in one buffer and 10.8 ms in 4 MiB
# buffers (donated: 7.7 ms either way; benchmarks/results/adam_step_cpu.md, 10 leaves). Buffers
# of 4 MiB are reused from the heap.
_CPU_BUFFER_BYTES = 4 * 2**20

# Buffers are padded with zeros to a multiple of this many elements. XLA:CPU compiles Adam's
# fusion for an odd length into a loop 2-3x slower (10 buffers of 1,000,001 float32: 20.6 ms;
# of 1,000,000 or 1,000,002: 7.5 ms; a copy of either: 5.7 ms).
_PAD_TO = 128


def _padded(size: int) -> int:
  return -(-size // _PAD_TO) * _PAD_TO


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one leaf lives: `buffers[key][offset:offset + size].reshape(shape)`."""

  path: str
  key: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int
  size: int


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  """A leaf's shape, dtype and weak type (arrays, tracers, Python scalars, structs)."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  aval = jax.typeof(leaf)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _structure_error(got: Any, expected_paths: list[str], what: str) -> ValueError:
  got_paths = [_common.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(got)[0]]
  detail = _common.paths_difference(expected_paths, got_paths) or [
    "the same leaf paths in different containers"
  ]
  return ValueError(f"{what} does not match the FlatLayout's tree: " + "; ".join(detail))


class FlatLayout:
  """A static map from a pytree's leaves to flat buffers, one or more per dtype (and group).

  The buffers are a dict `{key: 1-D array}` with keys `"float32"`, `"bfloat16"`, ...,
  `"float32/<label>"` when leaves are grouped, and `"float32#0"`, `"float32#1"`, ... when a
  dtype's leaves fill several buffers. Leaves keep their dtype (no promotion) and are laid out
  in tree order, whole, so offsets are static Python integers and :meth:`unravel` is a set of
  slices and reshapes. Each buffer ends with zeros up to a multiple of 128 elements (XLA:CPU
  runs Adam 2-3x slower on odd lengths). :meth:`unravel` never reads them and their gradient
  is zero, so they behave as a parameter that never gets a gradient: they stay zero, except
  where the optimizer's epsilon rounds to zero in the buffer's dtype (1e-8 in float16), where
  such a parameter turns NaN (0/0) per leaf too. (Zeroing them after the update would cost no
  traffic but would stop XLA fusing the update into `apply_updates`' add, which changes bits.)
  The layout holds no arrays: build it once from the initial parameters (or their
  `jax.ShapeDtypeStruct`s) and close over it in jitted functions.

  Args:
    tree: The parameter tree (arrays, `jax.ShapeDtypeStruct`s or anything with shape and dtype).
    group: Optional labels that split a dtype's leaves into separate buffers: a tree like
      `tree` of hashable labels, or a callable of `tree` returning one (like an optax mask; it
      receives `jax.ShapeDtypeStruct` leaves). Use it so that a weight-decay mask is constant
      within each buffer, e.g. `group=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`.
    max_buffer_bytes: Start a new buffer rather than grow one past this size (a larger leaf
      gets a buffer of its own). `"auto"`: 4 MiB on CPU, where a step that is not donated
      page-faults through every fresh buffer above glibc's mmap threshold (measured: 2-4x
      slower in one 40 MB buffer than in 4 MiB ones; donated steps run alike), and one buffer
      per dtype elsewhere. `None`: one buffer per dtype and group (fewer kernels to compile:
      0.13 s against 0.4-0.5 s for 10M parameters in eleven 4 MiB buffers).

  Raises:
    ValueError: if `group` does not match `tree`.

  Example:
    >>> import adamjax, jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "s": jnp.ones((), jnp.bfloat16)}
    >>> layout = adamjax.FlatLayout(params)
    >>> flat = layout.ravel(params)
    >>> {k: v.shape for k, v in flat.items()}  # 1 and 9 elements, padded with zeros
    {'bfloat16': (128,), 'float32': (128,)}
    >>> tx = layout.optimizer(adamjax.adam(1e-3))
    >>> state = tx.init(flat)
    >>> def loss(flat):
    ...   p = layout.unravel(flat)           # the model reads leaves; grads come back flat
    ...   return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]) + p["s"].astype(jnp.float32)
    >>> grads = jax.grad(loss)(flat)
    >>> updates, state = tx.update(grads, state, flat)
    >>> flat = optax.apply_updates(flat, updates)
    >>> layout.unravel(flat)["b"].shape
    (3,)
  """

  def __init__(self, tree: Any, *, group: Any = None, max_buffer_bytes: int | None | str = "auto"):
    if max_buffer_bytes == "auto":
      max_buffer_bytes = _CPU_BUFFER_BYTES if jax.default_backend() == "cpu" else None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_common.path_str(path) for path, _ in leaves]
    structs = [_abstract(leaf) for _, leaf in leaves]
    labels = [None] * len(leaves)
    if group is not None:
      if callable(group):
        group = group(treedef.unflatten(structs))
      try:
        labels = treedef.flatten_up_to(group)
      except (ValueError, TypeError) as e:
        raise ValueError(f"group does not match the parameter tree: {e}") from e
    # Greedy packing in tree order: a leaf joins the open buffer of its dtype and group unless
    # that would pass `max_buffer_bytes`; a larger leaf gets a buffer of its own (a leaf is
    # never split, so unravel stays a slice).
    chunks: dict[str, list[int]] = {}  # base key -> element count of each of its buffers
    placed = []
    for struct, label in zip(structs, labels, strict=True):
      base = struct.dtype.name if label is None else f"{struct.dtype.name}/{label}"
      size = math.prod(struct.shape)
      sizes = chunks.setdefault(base, [0])
      if (
        max_buffer_bytes is not None
        and sizes[-1] > 0
        and (sizes[-1] + size) * struct.dtype.itemsize > max_buffer_bytes
      ):
        sizes.append(0)
      placed.append((base, len(sizes) - 1, sizes[-1], size))
      sizes[-1] += size
    names = {
      (base, i): base if len(sizes) == 1 else f"{base}#{i:0{len(str(len(sizes) - 1))}d}"
      for base, sizes in chunks.items()
      for i in range(len(sizes))
    }
    slots = tuple(
      _Slot(path, names[base, chunk], struct.dtype, struct.shape, offset, size)
      for path, struct, (base, chunk, offset, size) in zip(paths, structs, placed, strict=True)
    )
    self._treedef = treedef
    self._slots = slots
    self._members = {
      name: tuple(i for i, s in enumerate(slots) if s.key == name)
      for name in sorted(names.values())
    }
    self._used = {name: sum(slots[i].size for i in idx) for name, idx in self._members.items()}
    self._buffers = {
      name: jax.ShapeDtypeStruct((_padded(used),), slots[idx[0]].dtype)
      for (name, idx), used in zip(self._members.items(), self._used.values(), strict=True)
    }

  # ---- what the layout is ----

  @property
  def treedef(self) -> jax.tree_util.PyTreeDef:
    """The tree structure the layout flattens."""
    return self._treedef

  @property
  def buffers(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The flat buffers, `{key: ShapeDtypeStruct((size,), dtype)}`, in key order (sizes
    include the padding)."""
    return dict(self._buffers)

  @property
  def num_leaves(self) -> int:
    return len(self._slots)

  def leaf_structs(self) -> Any:
    """The tree of `jax.ShapeDtypeStruct`s the layout was built from (for masks and shapes)."""
    return self._treedef.unflatten([jax.ShapeDtypeStruct(s.shape, s.dtype) for s in self._slots])

  def __repr__(self) -> str:
    bufs = ", ".join(f"{k}[{b.shape[0]:,}]" for k, b in self._buffers.items())
    return f"FlatLayout({self.num_leaves} leaves -> {bufs})"

  def __eq__(self, other: object) -> bool:
    return isinstance(other, FlatLayout) and (self._treedef, self._slots) == (
      other._treedef,
      other._slots,
    )

  def __hash__(self) -> int:
    return hash((self._treedef, self._slots))

  # ---- tree <-> buffers ----

  def ravel(self, tree: Any) -> dict[str, jax.Array]:
    """Concatenates a tree laid out like the layout's into its flat buffers (a copy).

    Do this once, when training starts; the point of the layout is to never do it per step.

    Args:
      tree: A tree with the layout's structure, leaf shapes and dtypes (params, or a tree
        like them, such as per-leaf Adam moments).

    Returns:
      `{key: 1-D array}`, the leaves of each buffer in tree order, then zeros (the padding).

    Raises:
      ValueError: naming the first path that is missing, unexpected, mis-shaped or of another
        dtype (the layout never converts dtypes).
    """
    leaves = self._check_tree(tree, "the tree passed to ravel")
    out = {}
    for key, idx in self._members.items():
      parts = [jnp.ravel(leaves[i]) for i in idx]
      buf = self._buffers[key]
      if buf.shape[0] > self._used[key]:
        parts.append(jnp.zeros(buf.shape[0] - self._used[key], buf.dtype))
      # Always a new array, so donating the buffers never deletes the tree's leaves.
      out[key] = jnp.array(parts[0], copy=True) if len(parts) == 1 else jnp.concatenate(parts)
    return out

  def unravel(self, flat: Mapping[str, jax.Array]) -> Any:
    """The tree of leaves viewed in the flat buffers: slices and reshapes, no arithmetic.

    Under `jax.jit` XLA fuses each slice into the ops that consume the leaf, and the gradient
    of `unravel` with respect to the buffers is one concatenation per buffer, so
    `jax.grad(lambda flat: loss(layout.unravel(flat)))` returns flat gradients.

    Args:
      flat: The buffers, as :meth:`ravel` returns them, or buffers like them in another dtype
        (the flat first moments of `adamjax.adam(mu_dtype=jnp.bfloat16)`): each leaf takes its
        buffer's dtype.

    Returns:
      A tree with the layout's structure and shapes.

    Raises:
      ValueError: if the keys or sizes of `flat` are not the layout's.
    """
    self.check(flat, "the buffers passed to unravel", dtypes=False)
    leaves: list[Any] = [None] * len(self._slots)
    for key, idx in self._members.items():
      ends = np.cumsum([self._slots[i].size for i in idx])
      parts = jnp.split(flat[key], ends[:-1] if ends[-1] == flat[key].shape[0] else ends)
      for i, part in zip(idx, parts, strict=False):  # the last part may be the padding
        leaves[i] = part.reshape(self._slots[i].shape)
    return self._treedef.unflatten(leaves)

  def check(self, flat: Any, what: str = "the flat buffers", *, dtypes: bool = True) -> None:
    """Raises `ValueError` unless `flat` is a dict of this layout's buffers (keys, sizes, dtypes).

    Args:
      flat: The value to check.
      what: How the error message names it.
      dtypes: Also require each buffer's dtype to be the layout's.
    """
    if not isinstance(flat, Mapping) or set(flat) != set(self._buffers):
      if jax.tree.structure(flat, is_leaf=lambda x: x is None) == self._treedef:
        raise ValueError(
          f"{what} are a per-leaf tree, not the FlatLayout's buffers: call "
          "layout.ravel(tree) once, when training starts, and keep the buffers"
        )
      if not isinstance(flat, Mapping):
        raise ValueError(
          f"{what} must be a dict of flat buffers with keys "
          f"{sorted(self._buffers)}, got a {type(flat).__name__}"
        )
      raise ValueError(
        f"{what} have keys {sorted(map(str, flat))}, but the FlatLayout's buffers are "
        f"{sorted(self._buffers)}"
      )
    for key, buf in self._buffers.items():
      x = flat[key]
      if x is None:
        continue  # optax passes None through
      shape, dtype = tuple(jnp.shape(x)), jnp.result_type(x)
      if shape != buf.shape or (dtypes and dtype != buf.dtype):
        raise ValueError(
          f"{what}: buffer {key!r} is {dtype}{list(shape)}, but the FlatLayout expects "
          f"{buf.dtype}{list(buf.shape)}"
        )

  def _check_tree(self, tree: Any, what: str) -> list[Any]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != self._treedef:
      if isinstance(tree, Mapping) and set(tree) == set(self._buffers):
        raise ValueError(f"{what} is already flat (keys {sorted(tree)}); pass the tree")
      raise _structure_error(tree, [s.path for s in self._slots], what)
    for leaf, slot in zip(leaves, self._slots, strict=True):
      shape, dtype = tuple(jnp.shape(leaf)), jnp.result_type(leaf)
      if shape != slot.shape:
        raise ValueError(f"{what}: {slot.path} has shape {shape}, the layout expects {slot.shape}")
      if dtype != slot.dtype:
        raise ValueError(
          f"{what}: {slot.path} has dtype {dtype}, the layout expects "
          f"{slot.dtype} (FlatLayout never converts dtypes)"
        )
    return leaves

  # ---- masks ----

  def buffer_mask(
    self, mask: Any = None, *, exclude_from_weight_decay: Sequence[str] | None = None
  ) -> dict[str, bool]:
    """Turns a per-leaf boolean mask into one boolean per buffer (an optax mask for `flat`).

    A transformation given to :meth:`optimizer` sees the buffers, not the leaves, so a
    weight-decay mask must be given to it per buffer: `adamjax.adamw(..., mask=
    layout.buffer_mask(mask))`, `adamjax.keras_adamw(..., weight_decay_mask=
    layout.buffer_mask(exclude_from_weight_decay=["bias"]))`.

    Args:
      mask: A tree of booleans like the params or a prefix of them (as optax masks), or a
        callable of the params returning one (it receives :meth:`leaf_structs`); None: every
        leaf.
      exclude_from_weight_decay: Keras's rule (`adamjax.keras_adam`'s option of that name):
        regular expressions searched in each leaf's '/'-joined tree path; a match is False.

    Returns:
      `{key: bool}`.

    Raises:
      ValueError: if a buffer holds leaves with both values; build the layout with
        `group=mask` so that they live in separate buffers.
    """
    structs = self.leaf_structs()
    try:
      mask = _keras_weight_decay.decay_mask(structs, exclude_from_weight_decay, mask)
      values = self._treedef.flatten_up_to(jax.tree.broadcast(mask, structs))
    except (ValueError, TypeError) as e:
      raise ValueError(f"the mask does not match the parameter tree: {e}") from e
    out: dict[str, bool] = {}
    for key, idx in self._members.items():
      chosen = {bool(values[i]) for i in idx}
      if len(chosen) > 1:
        on = ", ".join(self._slots[i].path for i in idx if values[i])
        off = ", ".join(self._slots[i].path for i in idx if not values[i])
        raise ValueError(
          f"buffer {key!r} holds leaves the mask selects ({on[:200]}) and leaves it does "
          f"not ({off[:200]}); a flat buffer is decayed as a whole. Build "
          "the layout with FlatLayout(params, group=mask) so that they live in separate "
          "buffers"
        )
      out[key] = chosen.pop() if chosen else True
    return out

  # ---- the optimizer ----

  def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs the built transformation `tx` on this layout's flat buffers, or refuses it.

    Every adamjax preset, option and `scale_by_*` step is elementwise except the clips below,
    so on the flat buffers it returns, element for element, what it returns per leaf, and its
    state holds its moments as flat buffers too (Adam: two per buffer, plus scalars). The first
    `update` of each input shape traces `tx`'s update and refuses any operation that mixes
    elements of a buffer (a reduction, a slice, a reshape): Keras's `clipnorm` (a norm per
    tensor) and `global_clipnorm` (a sum over tensors in tree order), optax's norm clips. Clip
    the per-leaf gradients before they reach the buffers, or keep the per-leaf tree.

    .. warning::
      `tx` sees the buffers, not the leaves: whatever it decides from a tree's paths or shapes
      it decides on the buffers. Give weight-decay masks per buffer with :meth:`buffer_mask`
      (a per-leaf mask tree is refused at `init` or `update`, its structure being wrong; a
      mask *function* or Keras's `exclude_from_weight_decay` cannot be checked here and
      would be evaluated on the buffer keys).

    Args:
      tx: An optax transformation built for the buffers: `adamjax.keras_adam(1e-3)`,
        `adamjax.scale_by_tf1_adam(1e-3)`, `optax.inject_hyperparams(adamjax.adam)(1e-3)`, or
        a chain of them.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `init`/`update` take the flat buffers.

    Raises:
      TypeError: if `tx` is not a built transformation (a preset's constructor, say).
      ValueError: at `update`, for an inner update that is not elementwise, and for buffers
        that do not match the layout.

    Example:
      >>> import adamjax, jax, jax.numpy as jnp
      >>> params = {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}
      >>> decayed = lambda p: {"kernel": True, "bias": False}
      >>> layout = adamjax.FlatLayout(params, group=decayed)
      >>> sorted(layout.buffers)
      ['float32/False', 'float32/True']
      >>> mask = layout.buffer_mask(exclude_from_weight_decay=["bias"])
      >>> mask
      {'float32/False': False, 'float32/True': True}
      >>> tx = layout.optimizer(adamjax.keras_adamw(1e-3, weight_decay_mask=mask))
    """
    if not isinstance(tx, optax.GradientTransformation):
      what = getattr(tx, "__name__", type(tx).__name__)
      raise TypeError(
        f"FlatLayout.optimizer takes a built transformation, e.g. "
        f"layout.optimizer(adamjax.adam(1e-3)), got {what!r}"
      )
    inner = optax.with_extra_args_support(tx)
    checked: dict[Any, None] = {}
    keys = sorted(self._buffers)

    def init_fn(params):
      self.check(params, "the params passed to init")
      try:
        return inner.init(params)
      except (ValueError, TypeError) as e:
        e.add_note(_PER_BUFFER_NOTE.format(keys=keys))
        raise

    def update_fn(updates, state, params=None, **extra_args):
      self.check(updates, "the gradients passed to update")
      if params is not None:
        self.check(params, "the params passed to update")
      abstract = jax.tree.map(_abstract, (updates, state, params))
      signature = (jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract)))
      if signature not in checked:
        try:
          jaxpr = jax.make_jaxpr(functools.partial(inner.update, **extra_args))(*abstract)
        except (ValueError, TypeError) as e:
          e.add_note(_PER_BUFFER_NOTE.format(keys=keys))
          raise
        mixing = _first_mixing_op(
          jaxpr.jaxpr, {v for v in jaxpr.jaxpr.invars if v.aval.shape != ()}
        )
        if mixing is not None:
          raise ValueError(
            f"the transformation is not elementwise: its update applies `{mixing}` to a flat "
            "buffer, which on a FlatLayout would mix parameter tensors (a norm, a sum, a "
            "reshape: Keras's clipnorm and global_clipnorm, optax's norm clips). Clip the "
            "per-leaf gradients before they reach the buffers, use elementwise options "
            "(clipvalue), or keep the per-leaf tree"
          )
        checked[signature] = None
      return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_PER_BUFFER_NOTE = (
  "FlatLayout.optimizer: the transformation sees the flat buffers {keys}, not the parameter "
  "tree; give masks per buffer, e.g. mask=layout.buffer_mask(per_leaf_mask)"
)


# Primitives that compute each output element from the same element of each input. Anything else
# applied to a buffer-derived array (reduce_sum, slice, reshape, dot_general, ...) mixes elements.
_ELEMENTWISE = frozenset(
  """
    abs acos acosh add and asin asinh atan atan2 atanh bitcast_convert_type cbrt ceil clamp conj
    convert_element_type copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not
    optimization_barrier or pow real reduce_precision rem round rsqrt select_n shift_left
    shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient sub tan
    tanh xor""".split()
)


def _first_mixing_op(jaxpr: jex.Jaxpr, tainted: set[Any]) -> str | None:
  """The first primitive in `jaxpr` that mixes elements of a non-scalar `tainted` value.

  `tainted` holds the variables derived from the flat buffers. Scalars (step counts, bias
  corrections, norms of nothing) and broadcasts of scalars may do anything. Call-like
  primitives (jit, cond, custom_jvp, while) are checked inside, conservatively: every
  non-scalar input of the inner jaxpr counts as buffer-derived.
  """
  for eqn in jaxpr.eqns:
    touched = [
      v for v in eqn.invars if isinstance(v, jex.Var) and v in tainted and v.aval.shape != ()
    ]
    if not touched:
      continue
    inner = list(jex.jaxprs_in_params(eqn.params))
    if inner:
      for sub in inner:
        found = _first_mixing_op(sub, {v for v in sub.invars if v.aval.shape != ()})
        if found is not None:
          return found
    elif eqn.primitive.name not in _ELEMENTWISE:
      return eqn.primitive.name
    tainted.update(eqn.outvars)
  return None
