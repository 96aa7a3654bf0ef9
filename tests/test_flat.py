"""adamjax.FlatLayout: flat-resident buffers give the per-leaf results bit for bit, or refuse."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adamjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(low=jnp.bfloat16):
  """Mixed dtypes and shapes: float32 plus a low-precision dtype, a scalar, an empty leaf."""
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "dense": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.zeros(4)},
    "scale": jnp.asarray(0.5),
    "emb": [jax.random.normal(k[1], (2, 3, 4)).astype(low), jnp.zeros((0,), low)],
    "norm": {"scale": jnp.ones(5, low), "bias": jax.random.normal(k[2], (5,))},
  }


def _grads(t, params):
  """Gradients whose elements span 1e-8 to 1e1 (so epsilon and rounding both matter)."""

  def leaf(i, p):
    key = jax.random.fold_in(jax.random.key(t), i)
    mag = 10.0 ** jax.random.randint(jax.random.fold_in(key, 1), p.shape, -8, 2)
    return (jax.random.normal(key, p.shape) * mag).astype(p.dtype)

  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([leaf(i, p) for i, p in enumerate(leaves)])


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.reshape(-1).view(np.uint8).tobytes()


def _assert_bit_identical(per_leaf, flat, layout):
  """Compares two optimizer states or parameter trees, unravelling the flat buffers."""
  is_flat = lambda x: isinstance(x, dict) and set(x) == set(layout.buffers)  # noqa: E731
  flat = jax.tree.map(lambda x: layout.unravel(x) if is_flat(x) else x, flat, is_leaf=is_flat)
  a_leaves, a_def = jax.tree.flatten(per_leaf)
  b_leaves, b_def = jax.tree.flatten(flat)
  assert a_def == b_def
  for i, (a, b) in enumerate(zip(a_leaves, b_leaves, strict=True)):
    assert _bits(a) == _bits(b), f"leaf {i} of {a_def} differs"


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _decayed(p):
  return jax.tree.map(lambda x: x.ndim > 1, p)


def _not_bias_or_scale(p):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not re.search("bias|scale", jax.tree_util.keystr(path)), p
  )


def _for_buffers(layout, kwargs):
  """A preset's options with its weight-decay masks given per buffer, as a user gives them."""
  kwargs = dict(kwargs)
  if "mask" in kwargs:
    kwargs["mask"] = layout.buffer_mask(kwargs["mask"])
  exclude = kwargs.pop("exclude_from_weight_decay", None)
  if exclude or "weight_decay_mask" in kwargs:
    kwargs["weight_decay_mask"] = layout.buffer_mask(
      kwargs.get("weight_decay_mask"), exclude_from_weight_decay=exclude
    )
  return kwargs


def _schedule(count):
  return 1e-2 * 0.9 ** count.astype(jnp.float32)


# name -> (factory, args, kwargs, low-precision dtype, group of the layout). Keras and TF1
# compute in the parameter dtype and refuse bfloat16 (beta_2 rounds to 1), so they get float16.
PRESETS = {
  "adam": (adamjax.adam, (1e-2,), {}, jnp.bfloat16, None),
  "adam_nesterov_mu_bf16": (
    adamjax.adam,
    (1e-2,),
    dict(nesterov=True, mu_dtype=jnp.bfloat16, eps_root=1e-12),
    jnp.bfloat16,
    None,
  ),
  "adamw": (adamjax.adamw, (1e-2,), dict(weight_decay=0.1), jnp.bfloat16, None),
  "adamw_mask": (
    adamjax.adamw,
    (1e-2,),
    dict(weight_decay=0.1, mask=_decayed),
    jnp.bfloat16,
    _decayed,
  ),
  "keras_adam": (adamjax.keras_adam, (1e-2,), {}, jnp.float16, None),
  "keras_adam_options": (
    adamjax.keras_adam,
    (1e-2,),
    dict(
      amsgrad=True,
      weight_decay=0.01,
      use_ema=True,
      ema_overwrite_frequency=3,
      clipvalue=0.5,
      loss_scale_factor=4.0,
    ),
    jnp.float16,
    None,
  ),
  "keras_adam_accumulation_schedule": (
    adamjax.keras_adam,
    (_schedule,),
    dict(gradient_accumulation_steps=2),
    jnp.float16,
    None,
  ),
  "keras_adam_fma": (adamjax.keras_adam, (1e-2,), dict(fused_multiply_add=True), jnp.float16, None),
  "keras_adamw": (adamjax.keras_adamw, (1e-2,), {}, jnp.float16, None),
  "keras_adamw_exclude": (
    adamjax.keras_adamw,
    (1e-2,),
    dict(weight_decay=0.1, exclude_from_weight_decay=["bias", "scale"]),
    jnp.float16,
    _not_bias_or_scale,
  ),
  "keras_adamw_mask": (
    adamjax.keras_adamw,
    (1e-2,),
    dict(weight_decay=0.1, weight_decay_mask=_decayed),
    jnp.float16,
    _decayed,
  ),
  "tf1_adam": (adamjax.tf1_adam, (1e-2,), {}, jnp.float16, None),
  "torch_adam": (adamjax.torch_adam, (1e-2,), {}, jnp.bfloat16, None),
  "torch_adam_options": (
    adamjax.torch_adam,
    (1e-2,),
    dict(weight_decay=0.01, amsgrad=True, maximize=True),
    jnp.bfloat16,
    None,
  ),
  "torch_adam_no_fma": (
    adamjax.torch_adam,
    (1e-2,),
    dict(fused_multiply_add=False),
    jnp.bfloat16,
    None,
  ),
  "torch_adamw": (adamjax.torch_adamw, (1e-2,), {}, jnp.bfloat16, None),
}


@pytest.mark.parametrize("max_buffer_bytes", [None, 32], ids=["one_buffer", "small_buffers"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flat_preset_is_bit_identical_to_per_leaf(name, max_buffer_bytes):
  factory, args, kwargs, low, group = PRESETS[name]
  params = _params(low)
  layout = adamjax.FlatLayout(params, group=group, max_buffer_bytes=max_buffer_bytes)
  one_per_dtype = adamjax.FlatLayout(params, group=group, max_buffer_bytes=None)
  assert (len(layout.buffers) > len(one_per_dtype.buffers)) == (max_buffer_bytes is not None)
  tx = factory(*args, **kwargs)
  flat_tx = layout.optimizer(factory(*args, **_for_buffers(layout, kwargs)))
  step, flat_step = _step(tx), _step(flat_tx)
  state = tx.init(params)
  flat = layout.ravel(params)
  flat_state = flat_tx.init(flat)
  for t in range(6):
    grads = _grads(t, params)
    params, state = step(params, state, grads)
    flat, flat_state = flat_step(flat, flat_state, layout.ravel(grads))
  _assert_bit_identical(params, flat, layout)
  _assert_bit_identical(state, flat_state, layout)
  assert not bool(jnp.all(params["dense"]["kernel"] == _params(low)["dense"]["kernel"]))
  # The padding behaves as parameters without gradients: zero, or NaN (0/0) where epsilon
  # rounds to zero in the buffer's dtype (TF1's 1e-8 in float16), as per leaf.
  padding = layout.ravel(jax.tree.map(jnp.ones_like, params))  # 0 exactly at the padding
  for key, buf in flat.items():
    values = np.asarray(buf)[np.asarray(padding[key]) == 0]
    if name == "tf1_adam" and key.startswith("float16"):
      assert np.all(np.isnan(values))
    else:
      assert not np.any(values)


def test_ravel_unravel_round_trip_keeps_dtypes_shapes_and_bits():
  params = _params(jnp.float16)
  params["half"] = jnp.arange(3, dtype=jnp.bfloat16)
  layout = adamjax.FlatLayout(params)
  flat = layout.ravel(params)
  # 3, 29 and 22 elements, each buffer padded with zeros to 128 (XLA:CPU is slow on odd lengths)
  assert {k: (v.dtype, v.shape) for k, v in flat.items()} == {
    "bfloat16": (jnp.bfloat16, (128,)),
    "float16": (jnp.float16, (128,)),
    "float32": (jnp.float32, (128,)),
  }
  assert not np.any(np.asarray(flat["float32"][22:])) and np.any(np.asarray(flat["float32"]))
  _assert_bit_identical(params, layout.unravel(flat), layout)
  _assert_bit_identical(params, jax.jit(lambda f: layout.unravel(f))(flat), layout)
  assert layout.num_leaves == 8 and layout == adamjax.FlatLayout(params)
  assert hash(layout) == hash(adamjax.FlatLayout(params))
  assert repr(layout) == "FlatLayout(8 leaves -> bfloat16[128], float16[128], float32[128])"
  structs = layout.leaf_structs()
  assert structs["dense"]["kernel"] == jax.ShapeDtypeStruct((3, 4), jnp.float32)


def test_buffers_are_packed_whole_leaves_up_to_max_buffer_bytes():
  tree = {
    "a": jax.ShapeDtypeStruct((3_000_000,), jnp.float32),  # 12 MB: a buffer of its own
    "b": jax.ShapeDtypeStruct((10, 10), jnp.float32),
    "c": jax.ShapeDtypeStruct((20,), jnp.float32),
    "d": jax.ShapeDtypeStruct((5,), jnp.bfloat16),
  }
  auto = adamjax.FlatLayout(tree)  # 4 MiB on CPU
  padded = lambda n: -(-n // 128) * 128  # noqa: E731
  assert {k: v.shape[0] for k, v in auto.buffers.items()} == {
    "bfloat16": 128,
    "float32#0": padded(3_000_000),
    "float32#1": 128,
  }
  small = adamjax.FlatLayout(tree, max_buffer_bytes=400)
  assert {k: v.shape[0] for k, v in small.buffers.items()} == {
    "bfloat16": 128,
    "float32#0": padded(3_000_000),
    "float32#1": 128,
    "float32#2": 128,
  }
  one = adamjax.FlatLayout(tree, max_buffer_bytes=None)
  assert {k: v.shape[0] for k, v in one.buffers.items()} == {
    "bfloat16": 128,
    "float32": padded(3_000_120),
  }
  params = _params()
  layout = adamjax.FlatLayout(params, max_buffer_bytes=16)
  _assert_bit_identical(params, layout.unravel(layout.ravel(params)), layout)


def test_layout_from_shape_structs_and_groups():
  params = _params()
  layout = adamjax.FlatLayout(jax.eval_shape(lambda: params), group=_decayed)
  assert sorted(layout.buffers) == [
    "bfloat16/False",
    "bfloat16/True",
    "float32/False",
    "float32/True",
  ]
  assert layout.buffers["float32/True"].shape == (128,)
  assert layout.buffer_mask(_decayed) == {
    "bfloat16/False": False,
    "bfloat16/True": True,
    "float32/False": False,
    "float32/True": True,
  }
  prefix = {
    "dense": {"kernel": True, "bias": False},
    "emb": [True, False],
    "norm": False,
    "scale": False,
  }  # an optax-style prefix mask: "norm" covers both its leaves
  assert layout.buffer_mask(prefix) == layout.buffer_mask(_decayed)
  with pytest.raises(ValueError, match="the mask does not match the parameter tree"):
    layout.buffer_mask({"dense": True})
  _assert_bit_identical(params, layout.unravel(layout.ravel(params)), layout)


def test_gradient_through_unravel_is_the_flat_gradient():
  params = _params()
  layout = adamjax.FlatLayout(params)

  def loss(tree):
    return sum(
      jnp.sum(jnp.sin(x.astype(jnp.float32)) * (i + 1)) for i, x in enumerate(jax.tree.leaves(tree))
    )

  flat_grads = jax.jit(jax.grad(lambda f: loss(layout.unravel(f))))(layout.ravel(params))
  _assert_bit_identical(jax.jit(jax.grad(loss))(params), flat_grads, layout)


def test_optimizer_state_is_two_moments_per_parameter_plus_scalars():
  params = _params()
  layout = adamjax.FlatLayout(params)
  flat = layout.ravel(params)
  param_bytes = sum(x.nbytes for x in flat.values())
  for factory, kwargs, mu_bytes in [
    (adamjax.adam, {}, param_bytes),
    (adamjax.adam, {"mu_dtype": jnp.bfloat16}, None),
    (adamjax.torch_adam, {}, param_bytes),
  ]:
    state = layout.optimizer(factory(1e-3, **kwargs)).init(flat)
    leaves = jax.tree.leaves(state)
    arrays = [x for x in leaves if x.ndim > 0]
    assert len(arrays) == 2 * len(flat)  # mu and nu, one buffer per dtype each
    assert sum(x.size for x in arrays) == 2 * sum(x.size for x in flat.values())
    if mu_bytes is not None:
      assert sum(x.nbytes for x in arrays) == param_bytes + mu_bytes
    assert sum(x.nbytes for x in leaves if x.ndim == 0) <= 16  # the step count


def test_donated_step_needs_no_memory_beyond_params_grads_and_state():
  params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
  layout = adamjax.FlatLayout(params)
  tx = layout.optimizer(adamjax.keras_adam(1e-3))
  flat = layout.ravel(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(flat)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(flat, state, flat).compile()
  mem = compiled.memory_analysis()
  resident = sum(x.nbytes for x in jax.tree.leaves((flat, state, flat)))
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )
  assert peak - resident <= 1024, (peak, resident)


def test_works_inside_optax_chain_and_with_a_chain():
  params = _params()
  layout = adamjax.FlatLayout(params)
  per_leaf = optax.chain(optax.clip(0.1), adamjax.adam(1e-2))
  for flat_tx in [
    optax.chain(optax.clip(0.1), layout.optimizer(adamjax.adam(1e-2))),
    layout.optimizer(optax.chain(optax.clip(0.1), adamjax.adam(1e-2))),
  ]:
    p = jax.tree.map(jnp.copy, params)  # the steps donate
    s = per_leaf.init(p)
    f, fs = layout.ravel(params), flat_tx.init(layout.ravel(params))
    for t in range(3):
      g = _grads(t, params)
      p, s = _step(per_leaf)(p, s, g)
      f, fs = _step(flat_tx)(f, fs, layout.ravel(g))
    _assert_bit_identical(p, f, layout)


def test_inject_hyperparams_learning_rate_changes_without_retracing():
  params = _params(jnp.float16)
  layout = adamjax.FlatLayout(params)
  factory = optax.inject_hyperparams(adamjax.keras_adam)
  tx, flat_tx = factory(learning_rate=1e-2), layout.optimizer(factory(learning_rate=1e-2))
  p, s = params, tx.init(params)
  f, fs = layout.ravel(params), flat_tx.init(layout.ravel(params))
  step, flat_step = _step(tx), _step(flat_tx)
  for t in range(4):
    if t == 2:
      s.hyperparams["learning_rate"] = s.hyperparams["learning_rate"] * 0.3
      fs.hyperparams["learning_rate"] = fs.hyperparams["learning_rate"] * 0.3
    g = _grads(t, params)
    p, s = step(p, s, g)
    f, fs = flat_step(f, fs, layout.ravel(g))
  _assert_bit_identical(p, f, layout)
  assert flat_step._cache_size() == 1


@pytest.mark.parametrize("pure_dict", [False, True])
def test_nnx_model_trains_on_flat_buffers_as_on_its_state(pure_dict):
  model = nnx.Sequential(
    nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1))
  )
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state) if pure_dict else state
  layout = adamjax.FlatLayout(params)
  x = jax.random.normal(jax.random.key(2), (16, 3))
  y = jax.random.normal(jax.random.key(3), (16, 2))

  def loss(params):
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

  tx, flat_tx = adamjax.keras_adam(1e-2), layout.optimizer(adamjax.keras_adam(1e-2))

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def flat_step(flat, opt_state):
    grads = jax.grad(lambda f: loss(layout.unravel(f)))(flat)
    updates, opt_state = flat_tx.update(grads, opt_state, flat)
    return optax.apply_updates(flat, updates), opt_state

  p, s = params, tx.init(params)
  f = layout.ravel(params)
  fs = flat_tx.init(f)
  first = float(loss(p))
  for _ in range(20):
    p, s = step(p, s)
    f, fs = flat_step(f, fs)
  _assert_bit_identical(p, f, layout)
  assert float(loss(layout.unravel(f))) < 0.8 * first
  nnx.update(model, layout.unravel(f))  # back into the model
  assert bool(jnp.all(model(x) == nnx.merge(graphdef, p)(x)))


# ---- errors ----


def test_ravel_names_the_leaf_that_does_not_match():
  params = _params()
  layout = adamjax.FlatLayout(params)
  missing = {k: v for k, v in params.items() if k != "scale"}
  with pytest.raises(
    ValueError,
    match=r"does not match the FlatLayout's tree: missing "
    r"\['scale'\]",
  ):
    layout.ravel(missing)
  wrong_shape = dict(params, scale=jnp.ones(2))
  with pytest.raises(ValueError, match=r"\['scale'\] has shape \(2,\), the layout expects \(\)"):
    layout.ravel(wrong_shape)
  wrong_dtype = dict(params, scale=jnp.asarray(0.5, jnp.bfloat16))
  with pytest.raises(ValueError, match=r"\['scale'\] has dtype bfloat16.*never converts"):
    layout.ravel(wrong_dtype)
  with pytest.raises(ValueError, match="already flat"):
    layout.ravel(layout.ravel(params))


def test_unravel_and_update_refuse_buffers_that_do_not_match():
  params = _params()
  layout = adamjax.FlatLayout(params)
  flat = layout.ravel(params)
  with pytest.raises(
    ValueError,
    match=r"buffer 'float32' is float32\[3\], but the FlatLayout "
    r"expects float32\[128\]",
  ):
    layout.unravel(dict(flat, float32=jnp.ones(3)))
  with pytest.raises(ValueError, match=r"have keys \['float32'\], but the FlatLayout's buffers"):
    layout.unravel({"float32": flat["float32"]})
  tx = layout.optimizer(adamjax.adam(1e-3))
  state = tx.init(flat)
  with pytest.raises(ValueError, match="gradients passed to update are a per-leaf tree"):
    tx.update(params, state, flat)
  with pytest.raises(
    ValueError,
    match=r"buffer 'bfloat16' is float32\[128\], but the "
    r"FlatLayout expects bfloat16\[128\]",
  ):
    tx.update(dict(flat, bfloat16=jnp.ones(128)), state, flat)
  with pytest.raises(ValueError, match="group does not match"):
    adamjax.FlatLayout(params, group={"dense": True})


@pytest.mark.parametrize("option", ["clipnorm", "global_clipnorm"])
def test_per_tensor_clipping_is_refused_at_the_first_update(option):
  params = _params(jnp.float16)
  layout = adamjax.FlatLayout(params)
  flat = layout.ravel(params)
  tx = layout.optimizer(adamjax.keras_adam(1e-3, **{option: 1.0}))
  with pytest.raises(
    ValueError, match="not elementwise: its update applies `reduce_sum`.*clipnorm"
  ):
    tx.update(flat, tx.init(flat), flat)
  off = layout.optimizer(adamjax.keras_adam(1e-3, **{option: None}))  # off, as in Keras
  off.update(flat, off.init(flat), flat)


def test_a_mask_that_splits_a_buffer_is_refused_with_the_fix():
  layout = adamjax.FlatLayout(_params())
  with pytest.raises(
    ValueError,
    match=r"buffer 'bfloat16' holds leaves the mask selects "
    r"\(\['emb'\]\[0\]\) and leaves it does not "
    r"\(\['emb'\]\[1\], \['norm'\]\['scale'\]\).*group=mask",
  ):
    layout.buffer_mask(_decayed)
  with pytest.raises(ValueError, match="holds leaves the mask selects"):
    layout.buffer_mask(exclude_from_weight_decay=["bias"])


def test_buffer_mask_follows_keras_exclusion_rule():
  layout = adamjax.FlatLayout(_params(), group=_not_bias_or_scale)
  assert layout.buffer_mask() == dict.fromkeys(layout.buffers, True)
  assert layout.buffer_mask(exclude_from_weight_decay=["bias", "scale"]) == layout.buffer_mask(
    _not_bias_or_scale
  )


def test_a_per_leaf_mask_is_refused_with_a_note_on_buffer_mask():
  params = _params()
  layout = adamjax.FlatLayout(params, group=_decayed)
  flat = layout.ravel(params)
  per_leaf = _decayed(params)
  tx = layout.optimizer(adamjax.adamw(1e-3, mask=per_leaf))
  with pytest.raises((ValueError, TypeError)) as info:
    tx.init(flat)
  assert "layout.buffer_mask" in "\n".join(getattr(info.value, "__notes__", []))
  keras = layout.optimizer(adamjax.keras_adamw(1e-3, weight_decay_mask=per_leaf))
  with pytest.raises((ValueError, TypeError)) as info:
    keras.update(flat, keras.init(flat), flat)
  assert "layout.buffer_mask" in "\n".join(getattr(info.value, "__notes__", []))


def test_optimizer_takes_a_built_transformation_not_a_constructor():
  layout = adamjax.FlatLayout(_params())
  with pytest.raises(TypeError, match=r"takes a built transformation.*got 'keras_adam'"):
    layout.optimizer(adamjax.keras_adam)


@pytest.mark.parametrize("name", ["keras", "tf1", "torch"])
def test_a_scale_by_step_on_flat_buffers_is_bit_identical(name):
  scale_by, low = {
    "keras": (adamjax.scale_by_keras_adam, jnp.float16),
    "tf1": (adamjax.scale_by_tf1_adam, jnp.float16),
    "torch": (adamjax.scale_by_torch_adam, jnp.bfloat16),
  }[name]
  params = _params(low)
  layout = adamjax.FlatLayout(params, max_buffer_bytes=32)
  tx = optax.chain(scale_by(1e-2), optax.scale(-1.0))
  flat_tx = optax.chain(layout.optimizer(scale_by(1e-2)), optax.scale(-1.0))
  p, s = params, tx.init(params)
  f = layout.ravel(params)
  fs = flat_tx.init(f)
  for t in range(4):
    g = _grads(t, params)
    p, s = _step(tx)(p, s, g)
    f, fs = _step(flat_tx)(f, fs, layout.ravel(g))
  _assert_bit_identical(p, f, layout)
  _assert_bit_identical(s, fs, layout)


def test_a_transformation_that_mixes_elements_is_refused_at_update():
  params = _params()
  layout = adamjax.FlatLayout(params)
  tx = layout.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))
  flat = layout.ravel(params)
  with pytest.raises(ValueError, match="is not elementwise: its update applies `reduce_sum`"):
    tx.update(flat, tx.init(flat), flat)
  chained = layout.optimizer(adamjax.keras_clip_by_norm(1.0))
  with pytest.raises(ValueError, match="not elementwise"):
    jax.jit(chained.update)(flat, chained.init(flat))


# ---- the benchmark harness ----


def test_benchmark_harness_quick_run_writes_its_table(tmp_path):
  out = tmp_path / "adam_step.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.adam_step",
      "--quick",
      "--frameworks",
      "torch",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert proc.stdout.strip().endswith(text.strip().splitlines()[-1])
  for line in [
    "# One Adam step on CPU",
    "- date: ",
    "- command: `python -m benchmarks.adam_step --quick",
    "- machine: ",
    "jax 0.10.2",
    "## Optimizer step",
    "## Targets",
    "## Whole training step of a toy model",
  ]:
    assert line in text, line
  header = (
    "| tree | variant | donated | ms/step | GB/s @28B | x copy | x optax.adam | "
    "compile s | peak MiB | over p+g+state MiB |"
  )
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert header in rows
  body = [line.split(" | ") for line in rows if line.count("|") == header.count("|")]
  variants = {(r[0].strip("| "), r[1]) for r in body if r[0] != "| tree"}
  for tree in ("1", "10", "mixed"):
    for variant in [
      "memcpy (numpy, 1 thread, 28 B/param)",
      "copy (same bytes)",
      "optax.adam",
      "adamjax.adam per-leaf",
      "flat adam, one buffer",
      "optax.flatten(adamjax.adam)",
      "torch.optim.Adam fused",
    ] + [f"flat {p}" for p in ("adam", "keras_adam", "tf1_adam", "torch_adamw")]:
      assert (tree, variant) in variants, (tree, variant)
    assert (tree, "flat adam (no donation)") in variants
  for row in body[1:]:  # every figure parses (their values are not checked: timings vary)
    float(row[3]), float(row[4])
  toy = "| tree | variant | ms/step | x tree | compile s | peak MiB | over p+g+state MiB |"
  assert toy in rows and sum(line.startswith("| mixed | toy step") for line in rows) == 2


def test_docstring_examples_run():
  import doctest
  import importlib

  result = doctest.testmod(
    importlib.import_module("adamjax._flat"), optionflags=doctest.NORMALIZE_WHITESPACE
  )
  assert result.attempted > 0 and result.failed == 0
