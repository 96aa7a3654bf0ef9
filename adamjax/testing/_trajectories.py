"""Drive the real Adam implementations on a fixed gradient sequence and record what they do.

The parity tests compare adamjax against these trajectories. Each runner feeds the same
gradients, step by step, to one reference implementation and records the parameters and the
optimizer slots after every step:

- `run_keras_jax`: Keras 3 on the JAX backend, through `optimizer.stateless_apply`, eagerly or
  under `jax.jit`.
- `run_keras_tf`: Keras 3 on the TensorFlow backend, `optimizer.apply_gradients` eagerly. It
  cannot share a process with the JAX backend, so it runs in a subprocess
  (`call_in_keras_backend`, this file's `keras_adam_trajectory` there).
- `run_tf1_adam`: `tf.compat.v1.train.AdamOptimizer` in eager mode (the `ApplyAdam` kernel with
  the float32 running-product beta powers).

Only the standard library and NumPy at module level (the subprocess loads this file by path, and
nothing else of the package): Keras, TensorFlow and JAX are imported inside the runner that needs
them, and the Keras backend is whatever the process chose before importing Keras (the tests set
`KERAS_BACKEND=jax`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np


class Trajectory(NamedTuple):
  """What a reference optimizer did, recorded after every step.

  Every array has the steps on axis 0 (`[steps, *shape]`), keyed by parameter name, and keeps
  the parameters' dtype (float32 in the parity tests).

  Attributes:
    params: the parameters after each step.
    m: the first moment (Keras `momentum`, TF v1 slot `m`).
    v: the second moment (Keras `velocity`, TF v1 slot `v`).
    v_hat: the AMSGrad running maximum (Keras `velocity_hat`); None when not recorded.
    extra: per-step scalars: `iterations` (int64, Keras runners: the optimizer's counter
      after the step, so 1..steps), `beta1_power`/`beta2_power` (float32, TF v1 runner: the
      accumulators after the step, i.e. beta**(t+1) as a running product).
  """

  params: dict[str, np.ndarray]
  m: dict[str, np.ndarray]
  v: dict[str, np.ndarray]
  v_hat: dict[str, np.ndarray] | None
  extra: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_gradient_sequence(
  shapes: Mapping[str, tuple[int, ...]],
  steps: int,
  seed: int,
  *,
  low: float = 1e-8,
  high: float = 1e2,
  zero_fraction: float = 0.03,
  quiet_fraction: float = 0.05,
) -> dict[str, np.ndarray]:
  """Random float32 gradients `[steps, *shape]` whose magnitudes span `low .. high`.

  Every element gets a random sign and a log-uniform magnitude, drawn afresh each step:
  - half of the elements (chosen per element) draw from the whole range `[low, high]`;
  - the other half draw from their own band (up to 2 decades wide, somewhere in the range),
    so some elements only ever see gradients of 1e-8 .. 1e-6 and their `sqrt(v)` stays near
    eps (1e-7 for Keras, 1e-8 for TF v1): that is where the eps formulations differ;
  - on `quiet_fraction` of the steps every gradient is drawn from `[low, 100 * low]`;
  - `zero_fraction` of the entries are exact zeros.

  Keys are processed in sorted order, so the result depends only on `shapes`, `steps` and
  `seed`, not on dict order.
  """
  rng = np.random.default_rng(seed)
  lo, hi = np.log10(low), np.log10(high)
  quiet = rng.random(steps) < quiet_fraction
  out = {}
  for name in sorted(shapes):
    shape = tuple(shapes[name])
    size = int(np.prod(shape, dtype=np.int64))
    banded = rng.random(size) < 0.5
    centre = rng.uniform(lo, hi, size)
    half_width = rng.uniform(0.0, 1.0, size)
    e_lo = np.where(banded, np.clip(centre - half_width, lo, hi), lo)
    e_hi = np.where(banded, np.clip(centre + half_width, lo, hi), hi)
    u = rng.random((steps, size))
    exponent = np.where(quiet[:, None], lo + 2.0 * u, e_lo + u * (e_hi - e_lo))
    sign = np.where(rng.random((steps, size)) < 0.5, -1.0, 1.0)
    g = sign * 10.0**exponent
    g[rng.random((steps, size)) < zero_fraction] = 0.0
    out[name] = g.astype(np.float32).reshape((steps, *shape))
  return out


def make_params(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Standard-normal float32 parameters for `shapes` (keys in sorted order)."""
  # A different stream from make_gradient_sequence(seed=seed).
  rng = np.random.default_rng([seed, 0x9A7A])
  return {
    name: np.asarray(rng.standard_normal(tuple(shapes[name])), dtype=np.float32)
    for name in sorted(shapes)
  }


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------


def _num_steps(names: list[str], params: Mapping[str, Any], grads: Mapping[str, Any]) -> int:
  """Check `grads[k]` is `[steps, *params[k].shape]` for every key, and return `steps`."""
  if set(params) != set(grads):
    raise KeyError(
      f"params and grads differ: only in params {sorted(set(params) - set(grads))}, "
      f"only in grads {sorted(set(grads) - set(params))}"
    )
  if not names:
    raise ValueError("no parameters given")
  for n in names:
    if np.ndim(grads[n]) == 0 or np.shape(grads[n])[1:] != np.shape(params[n]):
      raise ValueError(
        f"grads[{n!r}] has shape {np.shape(grads[n])}, expected [steps, *{np.shape(params[n])}]"
      )
  steps = {np.shape(grads[n])[0] for n in names}
  if len(steps) != 1 or steps == {0}:
    raise ValueError(f"gradients need the same number (>= 1) of steps, got {steps}")
  return steps.pop()


def _variable_name(i: int) -> str:
  # Parameter keys may contain "/" (which keras.Variable names may not) or collide once
  # sanitised ("a/b" vs "a_b"); index names cannot.
  return f"p{i}"


def keras_slot_indices(optimizer: Any, variables: list, slots: list[str]) -> dict[str, list[int]]:
  """Positions in `optimizer.variables` of each slot of each variable, found by name.

  Keras names a slot `f"{variable.path.replace('/', '_')}_{slot}"` (Keras 3
  `BaseOptimizer.add_variable_from_reference`); this looks each expected name up among
  `optimizer.variables` and insists on exactly one match, so an ordering change in Keras
  cannot silently pair a slot with the wrong parameter. Also returns `"iteration"`.
  """
  positions: dict[str, list[int]] = {}
  for i, ov in enumerate(optimizer.variables):
    positions.setdefault(ov.name, []).append(i)

  def find(name: str) -> int:
    found = positions.get(name, [])
    if len(found) != 1:
      raise LookupError(
        f"expected exactly one optimizer variable named {name!r}, found {len(found)} "
        f"among {[ov.path for ov in optimizer.variables]}"
      )
    return found[0]

  out = {"iteration": [find("iteration")]}
  for slot in slots:
    out[slot] = [find(f"{var.path.replace('/', '_')}_{slot}") for var in variables]
  return out


def _keras_slots(config: Mapping[str, Any]) -> list[str]:
  slots = ["momentum", "velocity"] + (["velocity_hat"] if config.get("amsgrad") else [])
  if config.get("use_ema"):
    slots.append("average")
  return slots


def make_keras_optimizer(
  keras: Any, config: Mapping[str, Any], variables: list, names: list[str]
) -> Any:
  """Builds `keras.optimizers.Adam` from a JSON-able `config` over `variables`.

  Besides Adam's own keyword arguments, `config` may hold:
  - `"learning_rate": {"schedule": <keras.optimizers.schedules.serialize(...) dict>}`;
  - `"_exclude_params": [name, ...]`: passed to `exclude_from_weight_decay(var_list=...)`
    before the optimizer is built.
  """
  config = dict(config)
  exclude = config.pop("_exclude_params", None)
  lr = config.get("learning_rate")
  if isinstance(lr, dict) and "schedule" in lr:
    config["learning_rate"] = keras.optimizers.schedules.deserialize(lr["schedule"])
  optimizer = keras.optimizers.Adam(**config)
  if exclude:
    optimizer.exclude_from_weight_decay(
      var_list=[v for v, n in zip(variables, names, strict=True) if n in exclude]
    )
  optimizer.build(variables)
  return optimizer


def _trajectory_from_slots(
  names: list[str], params: list, slots: dict[str, list], iterations: Any
) -> Trajectory:
  """Assemble a Trajectory from per-variable stacked arrays (`[steps, *shape]`)."""

  def by_name(arrays: list) -> dict[str, np.ndarray]:
    return {n: np.asarray(a) for n, a in zip(names, arrays, strict=True)}

  return Trajectory(
    params=by_name(params),
    m=by_name(slots["momentum"]),
    v=by_name(slots["velocity"]),
    v_hat=by_name(slots["velocity_hat"]) if "velocity_hat" in slots else None,
    extra={"iterations": np.asarray(iterations, dtype=np.int64)}
    | ({"average": by_name(slots["average"])} if "average" in slots else {}),
  )


def run_keras_jax(
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray],
  config: Mapping[str, Any],
  jit: bool,
) -> Trajectory:
  """Keras 3 `keras.optimizers.Adam(**config)` on the JAX backend, one `stateless_apply` a step.

  Variables are created from `params` in sorted-key order. With `jit=True` the step
  (`stateless_apply`) is wrapped in `jax.jit` and called once per step, as a user's jitted
  train step would; with `jit=False` it runs op by op.

  The process must have chosen the JAX backend (`KERAS_BACKEND=jax`) before importing Keras.
  """
  import jax
  import jax.numpy as jnp
  import keras

  if keras.backend.backend() != "jax":
    raise RuntimeError(
      f"run_keras_jax needs Keras on the JAX backend but it is running on "
      f"{keras.backend.backend()!r}: set os.environ['KERAS_BACKEND'] = 'jax' before the "
      f"first `import keras` in this process"
    )
  names = sorted(params)
  steps = _num_steps(names, params, grads)
  variables = [
    keras.Variable(np.asarray(params[n]), name=_variable_name(i)) for i, n in enumerate(names)
  ]
  optimizer = make_keras_optimizer(keras, config, variables, names)
  slots = _keras_slots(config)
  index = keras_slot_indices(optimizer, variables, slots)

  def step(opt_values, grad_values, param_values):
    new_params, new_opt = optimizer.stateless_apply(opt_values, grad_values, param_values)
    return list(new_params), list(new_opt)

  if jit:
    step = jax.jit(step)
  grads_dev = [jnp.asarray(grads[n]) for n in names]
  param_values = [v.value for v in variables]
  opt_values = [v.value for v in optimizer.variables]
  history = []
  for t in range(steps):
    param_values, opt_values = step(opt_values, [g[t] for g in grads_dev], param_values)
    history.append((param_values, opt_values))

  # np.stack on host copies: jnp.stack of 1000 arrays would compile a 1000-operand concat.
  def stack(get) -> list:
    return [np.stack([np.asarray(get(h, j)) for h in history]) for j in range(len(names))]

  stacked_params = stack(lambda h, j: h[0][j])
  stacked_slots = {s: stack(lambda h, j, s=s: h[1][index[s][j]]) for s in slots}
  iterations = np.array([np.asarray(h[1][index["iteration"][0]]) for h in history])
  return _trajectory_from_slots(names, stacked_params, stacked_slots, iterations)


def run_keras_tf(
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray],
  config: Mapping[str, Any],
  *,
  timeout: float = 600.0,
) -> Trajectory:
  """Keras 3 `keras.optimizers.Adam(**config)` on the TensorFlow backend, eager.

  Runs :func:`keras_adam_trajectory` in a subprocess with `KERAS_BACKEND=tensorflow` (a process
  holds one Keras backend), which calls `optimizer.apply_gradients` once per step outside any
  `tf.function`. `config` must be JSON-serialisable (as for `make_keras_optimizer`).
  """
  # Imported here: this file must stay loadable without the package (see the module docstring).
  from adamjax.testing._keras_subprocess import call_in_keras_backend

  names = sorted(params)
  _num_steps(names, params, grads)
  arrays = {f"param_{i}": np.asarray(params[n]) for i, n in enumerate(names)}
  arrays |= {f"grad_{i}": np.asarray(grads[n]) for i, n in enumerate(names)}
  spec = {"config": dict(config), "num_variables": len(names), "names": names}
  data = call_in_keras_backend(
    "tensorflow", __file__, "keras_adam_trajectory", arrays, spec, timeout=timeout
  )
  slots = _keras_slots(config)
  return _trajectory_from_slots(
    names,
    [data[f"params_{i}"] for i in range(len(names))],
    {s: [data[f"{s}_{i}"] for i in range(len(names))] for s in slots},
    data["iterations"],
  )


def keras_adam_trajectory(arrays: dict[str, np.ndarray], spec: dict) -> dict[str, np.ndarray]:
  """The subprocess side of :func:`run_keras_tf`, on whatever backend Keras runs.

  `arrays` holds `param_<i>` (initial values) and `grad_<i>` (`[steps, *shape]`); `spec` holds
  `config` (`make_keras_optimizer`'s), `num_variables` and `names`. Returns `params_<i>`,
  `momentum_<i>`, `velocity_<i>` (and `velocity_hat_<i>`, `average_<i>` when the config has
  them), each `[steps, *shape]`, and `iterations` `[steps]`. Each step is one eager
  `optimizer.apply_gradients`: no `tf.function`, no XLA, so on TensorFlow every Keras op runs as
  its own CPU kernel.
  """
  import keras

  config, n = spec["config"], spec["num_variables"]
  params = [arrays[f"param_{i}"] for i in range(n)]
  grads = [keras.ops.convert_to_tensor(arrays[f"grad_{i}"]) for i in range(n)]
  variables = [keras.Variable(p, name=_variable_name(i)) for i, p in enumerate(params)]
  optimizer = make_keras_optimizer(keras, config, variables, spec["names"])
  slots = _keras_slots(config)
  index = keras_slot_indices(optimizer, variables, slots)
  tracked = {"params": variables}
  tracked.update({s: [optimizer.variables[k] for k in index[s]] for s in slots})
  iteration = optimizer.variables[index["iteration"][0]]

  record: dict[str, list] = {key: [] for key in tracked}
  iterations = []
  for t in range(int(grads[0].shape[0])):
    optimizer.apply_gradients(zip([g[t] for g in grads], variables, strict=True))
    for key, vs in tracked.items():
      # A host copy of the current value (resource variables update in place).
      record[key].append([np.array(v.numpy()) for v in vs])
    iterations.append(np.array(iteration.numpy()))

  out = {"iterations": np.stack(iterations).astype(np.int64)}
  for key, rows in record.items():
    for i in range(n):
      out[f"{key}_{i}"] = np.stack([r[i] for r in rows])
  return out


# --------------------------------------------------------------------------------------------
# TensorFlow v1
# --------------------------------------------------------------------------------------------


def run_tf1_adam(
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray],
  learning_rate: float = 0.001,
  beta1: float = 0.9,
  beta2: float = 0.999,
  epsilon: float = 1e-8,
) -> Trajectory:
  """`tf.compat.v1.train.AdamOptimizer` in eager mode on resource variables.

  One `apply_gradients` a step (the dense `ResourceApplyAdam` kernel, then the shared
  `beta1_power *= beta1`, `beta2_power *= beta2` in float32). Records the `m` and `v` slots
  and, in `extra`, the beta-power accumulators after each step.
  """
  import tensorflow as tf

  names = sorted(params)
  steps = _num_steps(names, params, grads)
  variables = [
    tf.Variable(np.asarray(params[n]), name=_variable_name(i)) for i, n in enumerate(names)
  ]
  optimizer = tf.compat.v1.train.AdamOptimizer(
    learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon
  )
  grads_tf = [tf.constant(np.asarray(grads[n])) for n in names]
  rec: dict[str, list] = {"params": [], "m": [], "v": [], "b1p": [], "b2p": []}
  for t in range(steps):
    optimizer.apply_gradients([(g[t], var) for g, var in zip(grads_tf, variables, strict=True)])
    if t == 0:
      m_slots = [optimizer.get_slot(var, "m") for var in variables]
      v_slots = [optimizer.get_slot(var, "v") for var in variables]
      beta1_power, beta2_power = optimizer._get_beta_accumulators()
    # read_value() copies, so later in-place kernel updates do not alias the record.
    rec["params"].append([var.read_value() for var in variables])
    rec["m"].append([s.read_value() for s in m_slots])
    rec["v"].append([s.read_value() for s in v_slots])
    rec["b1p"].append(beta1_power.read_value())
    rec["b2p"].append(beta2_power.read_value())

  def stack(key: str) -> dict[str, np.ndarray]:
    return {n: tf.stack([r[j] for r in rec[key]]).numpy() for j, n in enumerate(names)}

  return Trajectory(
    params=stack("params"),
    m=stack("m"),
    v=stack("v"),
    v_hat=None,
    extra={
      "beta1_power": np.asarray(tf.stack(rec["b1p"]).numpy(), np.float32),
      "beta2_power": np.asarray(tf.stack(rec["b2p"]).numpy(), np.float32),
    },
  )
