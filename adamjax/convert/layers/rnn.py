"""Keras's recurrent layers: SimpleRNN, LSTM, GRU and Bidirectional (``keras/src/layers/rnn``).

Each layer is its cell's step (``simple_rnn.py``, ``lstm.py``, ``gru.py``: the same ``jnp`` ops in
the same order) run by the time loop of ``keras/src/backend/jax/rnn.py``: ``lax.scan`` over the
time-major sequence, where a masked timestep keeps the previous states and repeats the previous
output (or gives zeros with ``zero_output_for_mask``, which Bidirectional forces on when returning
sequences). GRU with ``reset_after`` and no mask takes Keras-JAX's fused path (``backend.gru``:
the input projection of every timestep in one matmul before the scan), as Keras does on every
device. LSTM's other path there is cuDNN, taken only on a GPU; this module always computes the
generic loop, which is what Keras computes on a CPU.

With ``unroll`` the loop is Keras's Python loop over the timesteps (same step ops; a masked step
repeats the previous output, zeros before the first, rather than the previous state). Stateful
layers (states that persist between batches) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register
from adamjax.convert.layers.activations import get_activation

Array = jax.Array
Step = Callable[[Array, list[Array]], tuple[Array, list[Array]]]


def _activation(config: Mapping[str, Any], key: str, default: str) -> Callable[[Array], Array]:
  # An absent key is Keras's default; a null one is linear (keras.activations.get(None)).
  return get_activation(config.get(key, default))


def _rate(config: Mapping[str, Any], key: str) -> float:
  """A dropout rate, clipped to [0, 1] as the Keras cells do."""
  value = option(config, key, (int, float), 0.0)
  if not np.isfinite(value):
    raise ConversionError(f"config {key} = {value!r} is not a finite number")
  return min(1.0, max(0.0, float(value)))


def _dropout_mask(rngs: Any, like: Array, rate: float, count: int | None) -> Any:
  """``DropoutRNNCell._create_dropout_mask``: ``count`` masks (one when None) shaped as ``like``,
  each ``backend.random.dropout`` of ones: ``1 / (1 - rate)`` where kept, else 0."""
  if rngs is None:
    raise ValueError("a recurrent layer with dropout needs rngs (an nnx.Rngs) in training")

  def one() -> Array:
    ones = jnp.ones_like(like)
    if rate == 1.0:
      return jnp.zeros_like(ones)
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rngs.dropout(), p=keep_prob, shape=ones.shape)
    return lax.select(keep, ones / keep_prob, jnp.zeros_like(ones))

  return one() if count is None else [one() for _ in range(count)]


def _swap_batch_timestep(x: Array) -> Array:
  axes = list(range(x.ndim))
  axes[0], axes[1] = 1, 0
  return jnp.transpose(x, axes)


def _expand_mask(mask_t: Array, input_t: Array) -> Array:
  for _ in range(input_t.ndim - mask_t.ndim):
    mask_t = jnp.expand_dims(mask_t, -1)
  return jnp.tile(mask_t, [1, *input_t.shape[1:]])


def _unrolled(step, inputs, initial_states, go_backwards, mask, return_all_outputs):
  """The ``unroll=True`` branch of Keras's ``rnn``: a Python loop over (time-major) steps. A
  masked step repeats the previous *output*, zeros before the first one (not the initial state),
  whatever ``zero_output_for_mask`` says."""
  steps = [lax.index_in_dim(inputs, i, 0, keepdims=False) for i in range(inputs.shape[0])]
  masks = None
  if mask is not None:
    masks = [lax.index_in_dim(mask, i, 0, keepdims=False) for i in range(mask.shape[0])]
  if go_backwards:
    steps.reverse()
    masks = masks[::-1] if masks is not None else None
  states = list(initial_states)
  outputs: list[Array] = []
  for i, x_t in enumerate(steps):
    output, new_states = step(x_t, states)
    if masks is not None:
      prev_output = outputs[-1] if outputs else jnp.zeros_like(output)
      output = jnp.where(_expand_mask(masks[i], output), output, prev_output)
      new_states = [
        jnp.where(_expand_mask(masks[i], s), ns, s)
        for s, ns in zip(states, new_states, strict=True)
      ]
    states = list(new_states)
    outputs = [*outputs, output] if return_all_outputs else [output]
  return outputs[-1], jnp.stack(outputs), states


def rnn(
  step: Step,
  inputs: Array,
  initial_states: list[Array],
  *,
  go_backwards: bool = False,
  mask: Array | None = None,
  unroll: bool = False,
  zero_output_for_mask: bool = False,
  return_all_outputs: bool = True,
) -> tuple[Array, Array, list[Array]]:
  """``keras/src/backend/jax/rnn.py`` ``rnn`` (batch-major inputs): ``(last_output, outputs,
  new_states)``, ``outputs`` batch-major in processing order (reversed with ``go_backwards``).

  Without ``unroll``, ``lax.scan``; a masked step keeps the states and outputs the previous
  state's first tensor (the previous output), or zeros with ``zero_output_for_mask``."""
  inputs = _swap_batch_timestep(inputs)
  if mask is not None:
    if mask.dtype != jnp.bool_:
      mask = mask.astype("bool")
    if mask.ndim == 2:
      mask = jnp.expand_dims(mask, axis=-1)
    mask = _swap_batch_timestep(mask)

  if unroll:
    last_output, outputs, new_states = _unrolled(
      step, inputs, initial_states, go_backwards, mask, return_all_outputs
    )
    return last_output, _swap_batch_timestep(outputs), new_states

  if mask is None:

    def _step(states, current_input):
      output_t, new_states = step(current_input, states)
      return new_states, output_t

    new_states, outputs = lax.scan(_step, initial_states, inputs, reverse=go_backwards)
  else:

    def _step(states, current_input):
      current_input, current_mask = current_input
      is_masked = jnp.all(jnp.logical_not(current_mask), axis=-1, keepdims=True)
      output_t, new_states = step(current_input, states)
      if zero_output_for_mask:
        masked_outs = jnp.where(is_masked, jnp.zeros_like(output_t), output_t)
      else:
        masked_outs = jnp.where(is_masked, states[0], output_t)
      new_states = [jnp.where(is_masked, s, ns) for s, ns in zip(states, new_states, strict=True)]
      return new_states, masked_outs

    new_states, outputs = lax.scan(_step, initial_states, (inputs, mask), reverse=go_backwards)
  if go_backwards:
    outputs = jnp.flip(outputs, axis=0)
  last_output = outputs[-1]
  return last_output, _swap_batch_timestep(outputs), new_states


class _Recurrent(Layer):
  """What ``keras/src/layers/rnn/rnn.py`` ``RNN`` does around a cell: initial states, dropout
  masks, the time loop, the casts and what ``call`` returns."""

  supports_masking = True
  call_args = ("sequences", "initial_state")
  gates: ClassVar[int] = 1
  n_states: ClassVar[int] = 1

  @classmethod
  def variables(cls, config):
    names = ("cell/kernel", "cell/recurrent_kernel")
    return names + ("cell/bias",) if option(config, "use_bias", bool, True) else names

  def bias_shape(self) -> tuple[int, ...]:
    return (self.gates * self.units,)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    units = option(config, "units", int, None)
    if units is None or units <= 0:
      raise ConversionError(f"config units = {config.get('units')!r} is not a positive integer")
    self.units = units
    self.use_bias = option(config, "use_bias", bool, True)
    self.activation = _activation(config, "activation", "tanh")
    self.return_sequences = option(config, "return_sequences", bool, False)
    self.return_state = option(config, "return_state", bool, False)
    self.go_backwards = option(config, "go_backwards", bool, False)
    self.unroll = option(config, "unroll", bool, False)
    self.zero_output_for_mask = option(config, "zero_output_for_mask", bool, False)
    if option(config, "stateful", bool, False):
      raise ConversionError("config stateful = True: stateful recurrent layers are not supported")
    if option(config, "time_major", bool, False):  # tf-keras only; Keras 3 has no such option
      raise ConversionError(
        "config time_major = True: time-major recurrent layers are not supported"
      )
    self.dropout = _rate(config, "dropout")
    self.recurrent_dropout = _rate(config, "recurrent_dropout")
    kernel = self.cell.kernel[...]
    width = self.gates * units
    if kernel.ndim != 2 or kernel.shape[1] != width:
      raise ConversionError(f"cell/kernel has shape {kernel.shape}, not (input_dim, {width})")
    if self.cell.recurrent_kernel[...].shape != (units, width):
      raise ConversionError(
        f"cell/recurrent_kernel has shape {self.cell.recurrent_kernel[...].shape},"
        f" not {(units, width)}"
      )
    if self.use_bias and self.cell.bias[...].shape != self.bias_shape():
      raise ConversionError(
        f"cell/bias has shape {self.cell.bias[...].shape}, not {self.bias_shape()}"
      )

  def cell_weights(self) -> tuple[Array, Array, Array | None]:
    """``kernel, recurrent_kernel, bias`` in the compute dtype (bias None without use_bias).

    A 1-D bias comes as a ``(1, n)`` row: adding it broadcasts exactly as Keras's implicit rank
    promotion does, and the module also runs where JAX's rank promotion is set to raise."""
    bias = None
    if self.use_bias:
      bias = self.cast(self.cell.bias[...])
      bias = bias[jnp.newaxis] if bias.ndim == 1 else bias
    return self.cast(self.cell.kernel[...]), self.cast(self.cell.recurrent_kernel[...]), bias

  def dropout_masks(self, step_input: Array, state: Array, training: bool, rngs: Any):
    """The cell's input and recurrent dropout masks (None where not applied)."""
    count = self.mask_count()
    dp = rec = None
    if training and self.dropout > 0:
      dp = _dropout_mask(rngs, step_input, self.dropout, count)
    if training and self.recurrent_dropout > 0:
      rec = _dropout_mask(rngs, state, self.recurrent_dropout, count)
    return dp, rec

  def mask_count(self) -> int | None:
    return None

  def step(self, dp_mask: Any, rec_mask: Any) -> Step:
    raise NotImplementedError

  def inner_loop(self, inputs, states, mask, dp_mask, rec_mask):
    return rnn(
      self.step(dp_mask, rec_mask),
      inputs,
      states,
      go_backwards=self.go_backwards,
      mask=mask,
      unroll=self.unroll,
      zero_output_for_mask=self.zero_output_for_mask,
      return_all_outputs=self.return_sequences,
    )

  def __call__(self, inputs, initial_state=None, *, training=False, mask=None, rngs=None):
    if isinstance(mask, list | tuple):
      mask = mask[0]
    if initial_state is None:
      states = [
        jnp.zeros((inputs.shape[0], self.units), dtype=self.compute_dtype)
        for _ in range(self.n_states)
      ]
    else:
      states = list(initial_state) if isinstance(initial_state, list | tuple) else [initial_state]
      if len(states) != self.n_states:
        raise ValueError(
          f"{type(self).__name__} takes {self.n_states} initial states, got {len(states)}"
        )
      states = [jnp.asarray(s, dtype=self.compute_dtype) for s in states]
    dp_mask, rec_mask = self.dropout_masks(inputs[:, 0, :], states[0], training, rngs)
    last_output, outputs, states = self.inner_loop(inputs, states, mask, dp_mask, rec_mask)
    last_output = last_output.astype(self.compute_dtype)
    outputs = outputs.astype(self.compute_dtype)
    states = [s.astype(self.compute_dtype) for s in states]
    output = outputs if self.return_sequences else last_output
    if self.return_state:
      return (output, *states)
    return output

  def compute_mask(self, inputs, mask):
    if isinstance(mask, list | tuple):
      mask = mask[0] if mask else None
    output_mask = mask if self.return_sequences else None
    if self.return_state:
      return [output_mask] + [None] * self.n_states
    return output_mask


@register("SimpleRNN")
class SimpleRNN(_Recurrent):
  """``keras/src/layers/rnn/simple_rnn.py``: ``h = activation(x @ kernel + bias + h @ recurrent)``."""

  def step(self, dp_mask, rec_mask):
    kernel, recurrent_kernel, bias = self.cell_weights()

    def step(sequence, states):
      prev_output = states[0]
      if dp_mask is not None:
        sequence = sequence * dp_mask
      h = jnp.matmul(sequence, kernel)
      if bias is not None:
        h = jnp.add(h, bias)
      if rec_mask is not None:
        prev_output = prev_output * rec_mask
      output = self.activation(h + jnp.matmul(prev_output, recurrent_kernel))
      return output, [output]

    return step


class _Gated(_Recurrent):
  """LSTM and GRU: a recurrent activation, Keras's two implementations and its fused-path switch."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.recurrent_activation = _activation(config, "recurrent_activation", "sigmoid")
    implementation = option(config, "implementation", int, 2)
    if implementation not in (1, 2):
      raise ConversionError(f"config implementation = {implementation!r} is not 1 or 2")
    # The cells switch to the split-kernel implementation whenever recurrent dropout is set.
    self.implementation = 1 if self.recurrent_dropout != 0.0 else implementation
    use_cudnn = config.get("use_cudnn", "auto")
    if use_cudnn != "auto" and not isinstance(use_cudnn, bool):
      raise ConversionError(f"config use_cudnn = {use_cudnn!r} is not 'auto', true or false")
    self.use_cudnn = use_cudnn

  def mask_count(self):
    return self.gates if self.implementation == 1 else None

  def dropout_masks(self, step_input, state, training, rngs):
    # The cells apply dropout only for rates strictly between 0 and 1.
    dp, rec = super().dropout_masks(step_input, state, training, rngs)
    dp = dp if 0.0 < self.dropout < 1.0 else None
    rec = rec if 0.0 < self.recurrent_dropout < 1.0 else None
    return dp, rec


@register("LSTM")
class LSTM(_Gated):
  """``keras/src/layers/rnn/lstm.py`` (``LSTMCell.call``, both implementations): gates i, f, c, o;
  ``c = f * c_tm1 + i * activation(z_c)``, ``h = o * activation(c)``."""

  gates = 4
  n_states = 2

  def step(self, dp_mask, rec_mask):
    kernel, recurrent_kernel, bias = self.cell_weights()
    units, act, ract = self.units, self.activation, self.recurrent_activation

    def fused(inputs, states):
      h_tm1, c_tm1 = states
      if dp_mask is not None:
        inputs = inputs * dp_mask
      z = jnp.matmul(inputs, kernel)
      z = jnp.add(z, jnp.matmul(h_tm1, recurrent_kernel))
      if bias is not None:
        z = jnp.add(z, bias)
      z0, z1, z2, z3 = jnp.split(z, 4, axis=1)
      i = ract(z0)
      f = ract(z1)
      c = f * c_tm1 + i * act(z2)
      o = ract(z3)
      h = o * act(c)
      return h, [h, c]

    def split(inputs, states):
      h_tm1, c_tm1 = states
      xs = [inputs * m for m in dp_mask] if dp_mask is not None else [inputs] * 4
      x = [jnp.matmul(xg, k) for xg, k in zip(xs, jnp.split(kernel, 4, axis=1), strict=True)]
      if bias is not None:
        x = [xg + b for xg, b in zip(x, jnp.split(bias, 4, axis=1), strict=True)]
      hs = [h_tm1 * m for m in rec_mask] if rec_mask is not None else [h_tm1] * 4
      rk = [recurrent_kernel[:, g * units : (g + 1) * units] for g in range(4)]
      i = ract(x[0] + jnp.matmul(hs[0], rk[0]))
      f = ract(x[1] + jnp.matmul(hs[1], rk[1]))
      c = f * c_tm1 + i * act(x[2] + jnp.matmul(hs[2], rk[2]))
      o = ract(x[3] + jnp.matmul(hs[3], rk[3]))
      h = o * act(c)
      return h, [h, c]

    return split if self.implementation == 1 else fused


@register("GRU")
class GRU(_Gated):
  """``keras/src/layers/rnn/gru.py`` (``GRUCell.call``, both implementations, ``reset_after`` true
  and false) and ``backend/jax/rnn.py`` ``gru``, the fused path Keras-JAX takes with
  ``reset_after``, no mask, no unroll and no recurrent dropout:
  ``h = z * h_tm1 + (1 - z) * activation(x_h + r * (h_tm1 @ recurrent_h + bias_h))``."""

  gates = 3

  def __init__(self, config, weights):
    self.reset_after = option(config, "reset_after", bool, True)
    super().__init__(config, weights)

  def bias_shape(self):
    return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

  def biases(self, bias):
    if bias is None:
      return None, None
    if not self.reset_after:
      return bias, None
    return bias[0:1], bias[1:2]

  def step(self, dp_mask, rec_mask):
    kernel, recurrent_kernel, bias = self.cell_weights()
    input_bias, recurrent_bias = self.biases(bias)
    units, act, ract = self.units, self.activation, self.recurrent_activation
    reset_after = self.reset_after

    def fused(inputs, states):
      h_tm1 = states[0]
      if dp_mask is not None:
        inputs = inputs * dp_mask
      matrix_x = jnp.matmul(inputs, kernel)
      if bias is not None:
        matrix_x = jnp.add(matrix_x, input_bias)
      x_z, x_r, x_h = jnp.split(matrix_x, 3, axis=-1)
      if reset_after:
        matrix_inner = jnp.matmul(h_tm1, recurrent_kernel)
        if bias is not None:
          matrix_inner = matrix_inner + recurrent_bias
      else:
        matrix_inner = jnp.matmul(h_tm1, recurrent_kernel[:, : 2 * units])
      recurrent_z = matrix_inner[:, :units]
      recurrent_r = matrix_inner[:, units : units * 2]
      recurrent_h = matrix_inner[:, units * 2 :]
      z = ract(x_z + recurrent_z)
      r = ract(x_r + recurrent_r)
      if reset_after:
        recurrent_h = r * recurrent_h
      else:
        recurrent_h = jnp.matmul(r * h_tm1, recurrent_kernel[:, 2 * units :])
      hh = act(x_h + recurrent_h)
      h = z * h_tm1 + (1 - z) * hh
      return h, [h]

    def split(inputs, states):
      h_tm1 = states[0]
      xs = [inputs * m for m in dp_mask] if dp_mask is not None else [inputs] * 3
      x_z = jnp.matmul(xs[0], kernel[:, :units])
      x_r = jnp.matmul(xs[1], kernel[:, units : units * 2])
      x_h = jnp.matmul(xs[2], kernel[:, units * 2 :])
      if bias is not None:
        x_z = x_z + input_bias[:, :units]
        x_r = x_r + input_bias[:, units : units * 2]
        x_h = x_h + input_bias[:, units * 2 :]
      hs = [h_tm1 * m for m in rec_mask] if rec_mask is not None else [h_tm1] * 3
      recurrent_z = jnp.matmul(hs[0], recurrent_kernel[:, :units])
      recurrent_r = jnp.matmul(hs[1], recurrent_kernel[:, units : units * 2])
      if reset_after and bias is not None:
        recurrent_z = recurrent_z + recurrent_bias[:, :units]
        recurrent_r = recurrent_r + recurrent_bias[:, units : units * 2]
      z = ract(x_z + recurrent_z)
      r = ract(x_r + recurrent_r)
      if reset_after:
        recurrent_h = jnp.matmul(hs[2], recurrent_kernel[:, units * 2 :])
        if bias is not None:
          recurrent_h = recurrent_h + recurrent_bias[:, units * 2 :]
        recurrent_h = r * recurrent_h
      else:
        recurrent_h = jnp.matmul(r * hs[2], recurrent_kernel[:, units * 2 :])
      hh = act(x_h + recurrent_h)
      h = z * h_tm1 + (1 - z) * hh
      return h, [h]

    return split if self.implementation == 1 else fused

  def inner_loop(self, inputs, states, mask, dp_mask, rec_mask):
    fast = (
      self.use_cudnn in ("auto", True)
      and self.recurrent_dropout == 0.0
      and self.reset_after
      and not self.unroll
      and mask is None
    )
    if not fast:
      if self.use_cudnn is True:
        raise ValueError(
          "GRU use_cudnn=True: Keras has no fused path for this configuration on JAX"
          " (it needs reset_after, no mask, no unroll and no recurrent dropout)"
        )
      return super().inner_loop(inputs, states, mask, dp_mask, rec_mask)
    if dp_mask is not None:
      if isinstance(dp_mask, list):  # implementation=1 from a config: one mask per gate
        return super().inner_loop(inputs, states, mask, dp_mask, rec_mask)
      inputs = inputs * jnp.broadcast_to(jnp.expand_dims(dp_mask, axis=1), inputs.shape)
    return self.fused_gru(inputs, states[0])

  def fused_gru(self, inputs, h_0):
    """``keras/src/backend/jax/rnn.py`` ``gru``."""
    kernel, recurrent_kernel, bias = self.cell_weights()
    if bias is not None:
      input_bias, recurrent_bias = bias[0:1], bias[1:2]
    else:  # float32, as Keras's
      input_bias = jnp.zeros((1, 3 * self.units))
      recurrent_bias = jnp.zeros((1, 3 * self.units))
    act, ract = self.activation, self.recurrent_activation
    if self.go_backwards:
      inputs = jnp.flip(inputs, axis=1)
    x_all = jnp.matmul(inputs, kernel) + input_bias[jnp.newaxis]
    x_all = jnp.swapaxes(x_all, 0, 1)

    def step(h, x_t):
      h_all = jnp.matmul(h, recurrent_kernel) + recurrent_bias
      x_z, x_r, x_h = jnp.split(x_t, 3, axis=-1)
      h_z, h_r, h_h = jnp.split(h_all, 3, axis=-1)
      z = ract(x_z + h_z)
      r = ract(x_r + h_r)
      hh = act(x_h + r * h_h)
      h_new = z * h + (1 - z) * hh
      return h_new, h_new

    h_last, outputs = lax.scan(step, h_0, x_all)
    return h_last, jnp.swapaxes(outputs, 0, 1), [h_last]


_WRAPPABLE = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}


def _sublayer_config(config: Mapping[str, Any], key: str) -> tuple[type[_Recurrent], dict]:
  entry = config.get(key)
  if not isinstance(entry, Mapping) or not isinstance(entry.get("config"), Mapping):
    raise ConversionError(f"config {key} is not a serialized layer (class_name and config)")
  class_name = entry.get("class_name")
  if class_name not in _WRAPPABLE:
    raise ConversionError(
      f"Bidirectional {key} class_name {class_name!r} is not one of {sorted(_WRAPPABLE)}"
    )
  return _WRAPPABLE[class_name], dict(entry["config"])


def _sublayers(config: Mapping[str, Any]):
  """``(class, config)`` of the forward and backward layers, as ``Bidirectional.__init__``
  builds them: the backward one is ``backward_layer`` or ``layer`` with ``go_backwards`` set."""
  forward = _sublayer_config(config, "layer")
  if config.get("backward_layer") is not None:
    backward = _sublayer_config(config, "backward_layer")
  else:
    backward = (forward[0], {**forward[1], "go_backwards": True})
  for name in ("go_backwards", "stateful", "return_sequences", "return_state"):
    same = option(forward[1], name, bool, False) == option(backward[1], name, bool, False)
    if same != (name != "go_backwards"):
      raise ConversionError(
        f"Bidirectional forward and backward layers {'share' if same else 'differ in'} {name}"
      )
  return forward, backward


@register("Bidirectional")
class Bidirectional(Layer):
  """``keras/src/layers/rnn/bidirectional.py``: the forward and backward layers on the same
  sequence, the backward output flipped back to input order when returning sequences, merged
  by ``merge_mode``. Keras-JAX's fused bidirectional LSTM is cuDNN (GPU only) and it has no
  fused GRU, so both run as the two layers here, as Keras does on a CPU."""

  supports_masking = True
  call_args = ("sequences", "initial_state")

  @classmethod
  def variables(cls, config):
    (fwd_cls, fwd_config), (bwd_cls, bwd_config) = _sublayers(config)
    return tuple(f"forward_layer/{n}" for n in fwd_cls.variables(fwd_config)) + tuple(
      f"backward_layer/{n}" for n in bwd_cls.variables(bwd_config)
    )

  def __init__(self, config, weights):
    super().__init__(config, weights)
    merge_mode = config.get("merge_mode", "concat")
    if merge_mode not in ("sum", "mul", "ave", "concat", None):
      raise ConversionError(
        f"config merge_mode = {merge_mode!r} is not one of sum, mul, ave, concat, null"
      )
    self.merge_mode = merge_mode
    for prefix, (cls, sub_config) in zip(
      ("forward_layer", "backward_layer"), _sublayers(config), strict=True
    ):
      sub_weights = {name: weights[f"{prefix}/{name}"] for name in cls.variables(sub_config)}
      layer = cls(sub_config, sub_weights)
      # Bidirectional forces zero outputs for masked steps when returning sequences.
      layer.zero_output_for_mask = layer.return_sequences
      setattr(self, prefix, layer)
    self.return_sequences = self.forward_layer.return_sequences
    self.return_state = self.forward_layer.return_state

  def __call__(self, inputs, initial_state=None, *, training=False, mask=None, rngs=None):
    if initial_state is not None:
      half = len(initial_state) // 2
      forward_state, backward_state = initial_state[:half], initial_state[half:]
    else:
      forward_state = backward_state = None
    kwargs = {"training": training, "mask": mask, "rngs": rngs}
    y = self.forward_layer(inputs, forward_state, **kwargs)
    y_rev = self.backward_layer(inputs, backward_state, **kwargs)
    if self.return_state:
      states = tuple(y[1:]) + tuple(y_rev[1:])
      y, y_rev = y[0], y_rev[0]
    y = y.astype(self.compute_dtype)
    y_rev = y_rev.astype(self.compute_dtype)
    if self.return_sequences:
      y_rev = jnp.flip(y_rev, axis=1)
    if self.merge_mode == "concat":
      output = jnp.concatenate([y, y_rev], axis=-1)
    elif self.merge_mode == "sum":
      output = y + y_rev
    elif self.merge_mode == "ave":
      output = (y + y_rev) / 2
    elif self.merge_mode == "mul":
      output = y * y_rev
    else:
      output = (y, y_rev)
    if self.return_state:
      if self.merge_mode is None:
        return output + states
      return (output, *states)
    return output

  def compute_mask(self, inputs, mask):
    # As Keras's: without stateful layers there are no state masks, even with return_state.
    if isinstance(mask, list):
      mask = mask[0]
    if self.return_sequences:
      return (mask, mask) if not self.merge_mode else mask
    return (None, None) if not self.merge_mode else None
