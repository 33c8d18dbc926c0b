"""PyTorch twins of fedvp_jax's models, for the side-by-side benchmark (``benchmarks/run.py``).

API:

* ``build_torch_model(name, history, horizon, *, latent_dim=32, head_hidden=64, fused=True)``
  -> :class:`ViewportModel` (``"transformer"`` or ``"lstm"``), the same layers and sizes as
  ``fedvp_jax.models.build_model``. ``forward(history f32[B, M, 3]) -> f32[B, H, 3]``,
  ``encode(history) -> z f32[B, latent_dim]``, ``head(z) -> f32[B, H, 3]``.
* ``build_torch_generator(latent_dim=32, *, noise_dim=32, hidden=256)`` ->
  :class:`SimpleGenerator`, FedGen's simple generator on the label's coordinates
  (``fedvp_jax.models.build_generator("simple", ...)``); ``forward(noise, y) -> z``.
* ``load_from_jax(module, jax_params)`` copies a fedvp_jax params pytree (from ``Model.init`` or
  ``Generator.init``; any arrays numpy can read) into the module, in place.
* ``init_like_flax(module, seed)``: flax's initialisers (LeCun-normal kernels, zero biases,
  orthogonal recurrent kernel, zero last head layer, gain 1), for runs without jax params.
* ``mse(prediction, target)``: ``fedvp_jax.metrics.mse``, the mean over every element.
* ``normalize``, ``motion_features``: ``fedvp_jax.geometry.normalize`` and
  ``fedvp_jax.models.head.motion_features``.
* ``flat_from_jax(module, jax_params) -> f32[P]``: jax params in the layout of the
  federations' ``server_state()`` / ``client_state(k)`` (trainable parameters in order).

It also holds what ``torch_seed`` and ``torch_vmap`` share, so that both draw and weigh
alike: ``client_tensors`` (``ClientData`` -> tensors), ``RoundInputs`` and
``sample_round_inputs`` (a round's batches, labels and noise), FedGen's schedules
(``generator_weights``, ``generator_learning_rate``) and ``diversity_loss``, and the grid of
``fedvp_jax.heatmap`` (``cell_index``, ``sample_labels``, ``label_weights``, ``combined``).

``fused=True`` uses PyTorch's own kernels (``nn.LSTM``, ``F.scaled_dot_product_attention``), as
a PyTorch researcher would write the model. They have no ``torch.func.vmap`` batching rule
(vmap falls back to a per-sample loop, with a warning), so ``fused=False`` spells the LSTM
cell and the attention out in plain tensor ops for ``torch_vmap``. Both give the same outputs
and hold parameters under the same names, so one state dict fits both.

Numerical details that must follow flax, not PyTorch's defaults: LayerNorm's epsilon is 1e-6
(PyTorch: 1e-5); GELU is the tanh approximation (``jax.nn.gelu``'s default; PyTorch's is the
exact erf); the LSTM has one bias (flax's ``OptimizedLSTMCell`` biases only the recurrent
Dense), so ``nn.LSTM``'s input bias is frozen at zero — trained, it would double the bias's
learning rate; the gate order i, f, g, o is the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from torch import nn

MOTION_DIM = 6
"""Leading coordinates of z holding the motion state (fedvp_jax.models.head.MOTION_DIM)."""

LAYER_NORM_EPS = 1e-6
"""flax's LayerNorm epsilon."""

_EPS = 1e-12
"""fedvp_jax.geometry's floor on a vector's norm."""


def normalize(v: torch.Tensor) -> torch.Tensor:
  """Projects ``v: f32[..., 3]`` onto the unit sphere (zero vectors map to zero)."""
  return v / torch.clamp(torch.linalg.vector_norm(v, dim=-1, keepdim=True), min=_EPS)


def motion_features(history: torch.Tensor) -> torch.Tensor:
  """Positions and per-step displacements ``f32[..., M, 6]``; the first displacement is 0."""
  steps = torch.diff(history, dim=-2, prepend=history[..., :1, :])
  return torch.cat([history, steps], dim=-1)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  """Mean squared error over every element (the training loss)."""
  return torch.mean(torch.square(prediction - target))


def _gelu(x: torch.Tensor) -> torch.Tensor:
  return F.gelu(x, approximate="tanh")


class Head(nn.Module):
  """``normalize(p + gain_k * k * v + offset_k(z))``, ``offset = Dense -> ReLU -> Dense``."""

  def __init__(self, latent_dim: int, hidden: int, horizon: int):
    super().__init__()
    self.horizon = horizon
    self.hidden = nn.Linear(latent_dim, hidden)
    self.out = nn.Linear(hidden, horizon * 3)
    self.gain = nn.Parameter(torch.ones(horizon))
    self.register_buffer("steps", torch.arange(1, horizon + 1, dtype=torch.float32)[:, None])

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    offsets = self.out(F.relu(self.hidden(z))).reshape(*z.shape[:-1], self.horizon, 3)
    position, displacement = z[..., None, 0:3], z[..., None, 3:6]
    return normalize(position + self.gain[:, None] * self.steps * displacement + offsets)


class Attention(nn.Module):
  """Multi-head self-attention with flax's layout: q, k, v, out projections with biases."""

  def __init__(self, width: int, num_heads: int, fused: bool):
    super().__init__()
    self.num_heads = num_heads
    self.fused = fused
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
    """Queries from ``x``, keys and values from ``kv`` (default ``x``)."""
    kv = x if kv is None else kv
    width = x.shape[-1]
    depth = width // self.num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
      # [..., heads, positions, depth], the layout both attention paths want.
      return t.reshape(*t.shape[:-1], self.num_heads, depth).transpose(-3, -2)

    q, k, v = heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv))
    if self.fused:
      o = F.scaled_dot_product_attention(q, k, v)
    else:
      scores = (q / math.sqrt(depth)) @ k.transpose(-2, -1)
      o = torch.softmax(scores, dim=-1) @ v
    o = o.transpose(-3, -2)
    return self.out(o.reshape(*x.shape))


class EncoderBlock(nn.Module):
  """Pre-norm self-attention and MLP, each with a residual connection."""

  def __init__(self, width: int, num_heads: int, mlp_width: int, fused: bool):
    super().__init__()
    self.attention_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
    self.attention = Attention(width, num_heads, fused)
    self.mlp_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
    self.mlp_in = nn.Linear(width, mlp_width)
    self.mlp_out = nn.Linear(mlp_width, width)

  def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """As fedvp_jax's block: ``last_only`` computes the last position's output alone."""
    y = self.attention_norm(x)
    if last_only:
      x, queries = x[..., -1:, :], y[..., -1:, :]
    else:
      queries = y
    x = x + self.attention(queries, y)
    return x + self.mlp_out(_gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerEncoder(nn.Module):
  """Embedding + learned positions, pre-norm blocks, LayerNorm, Dense of the last step."""

  def __init__(
    self,
    latent_dim: int,
    history: int,
    width: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_width: int = 128,
    fused: bool = True,
  ):
    super().__init__()
    self.embed = nn.Linear(6, width)
    self.position = nn.Parameter(0.02 * torch.randn(history, width))
    self.blocks = nn.ModuleList(
      [EncoderBlock(width, num_heads, mlp_width, fused) for _ in range(num_layers)]
    )
    self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
    self.out = nn.Linear(width, latent_dim - MOTION_DIM)

  def forward(self, history: torch.Tensor) -> torch.Tensor:
    x = self.embed(motion_features(history)) + self.position
    # The same work as fedvp_jax's encoder: the last block computes the last position only.
    last = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      x = block(x, last_only=i == last)
    return self.out(self.norm(x[..., -1, :]))


class LSTMLoop(nn.Module):
  """One LSTM layer as an explicit loop over steps, with ``nn.LSTM``'s parameter names.

  ``bias_ih_l0`` is a zero buffer, not a parameter: flax's cell has one bias.
  """

  def __init__(self, input_size: int, hidden: int):
    super().__init__()
    self.hidden_size = hidden
    self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden, input_size))
    self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden, hidden))
    self.bias_hh_l0 = nn.Parameter(torch.zeros(4 * hidden))
    self.register_buffer("bias_ih_l0", torch.zeros(4 * hidden))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """``f32[B, M, input] -> f32[B, hidden]``, the last step's output."""
    h = x.new_zeros(*x.shape[:-2], self.hidden_size)
    c = h
    # The input projection of every step at once; only the recurrence has to loop.
    projected = F.linear(x, self.weight_ih_l0)
    for t in range(x.shape[-2]):
      gates = projected[..., t, :] + F.linear(h, self.weight_hh_l0, self.bias_hh_l0)
      i, f, g, o = gates.chunk(4, dim=-1)
      c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
      h = torch.sigmoid(o) * torch.tanh(c)
    return h


class FusedLSTM(nn.Module):
  """``nn.LSTM`` (one layer) returning the last step's output; input bias frozen at zero."""

  def __init__(self, input_size: int, hidden: int):
    super().__init__()
    self.lstm = nn.LSTM(input_size, hidden, batch_first=True)
    with torch.no_grad():
      self.lstm.bias_ih_l0.zero_()
    self.lstm.bias_ih_l0.requires_grad_(False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out, _ = self.lstm(x)
    return out[:, -1]


class LSTMEncoder(nn.Module):
  """One LSTM layer of ``hidden`` units over the motion features, then Dense."""

  def __init__(self, latent_dim: int, hidden: int = 64, fused: bool = True):
    super().__init__()
    self.cell = FusedLSTM(6, hidden) if fused else LSTMLoop(6, hidden)
    self.out = nn.Linear(hidden, latent_dim - MOTION_DIM)

  def forward(self, history: torch.Tensor) -> torch.Tensor:
    return self.out(self.cell(motion_features(history)))


class ViewportModel(nn.Module):
  """An encoder and a :class:`Head`; z = (last position, last displacement, features)."""

  def __init__(self, encoder: nn.Module, head: Head):
    super().__init__()
    self.encoder = encoder
    self.head = head

  def encode(self, history: torch.Tensor) -> torch.Tensor:
    last = motion_features(history)[..., -1, :]
    return torch.cat([last, self.encoder(history)], dim=-1)

  def forward(self, history: torch.Tensor) -> torch.Tensor:
    return self.head(self.encode(history))


class SimpleGenerator(nn.Module):
  """FedGen's shape: Dense -> LayerNorm -> ReLU -> Dense, on ``[noise, y]``."""

  def __init__(self, noise_dim: int, hidden: int, latent_dim: int):
    super().__init__()
    self.noise_dim = noise_dim
    self.hidden = nn.Linear(noise_dim + 3, hidden)
    self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
    self.out = nn.Linear(hidden, latent_dim)

  def forward(self, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return self.out(F.relu(self.norm(self.hidden(torch.cat([noise, y], dim=-1)))))


MODELS = ("transformer", "lstm")


def build_torch_model(
  name: str,
  history: int,
  horizon: int,
  *,
  latent_dim: int = 32,
  head_hidden: int = 64,
  fused: bool = True,
) -> ViewportModel:
  """The named model, shaped like ``fedvp_jax.models.build_model(name, history, horizon)``.

  Args:
    name: ``"transformer"`` (2 pre-norm blocks, width 64, 4 heads, MLP 128) or ``"lstm"``
      (one layer of 64 units).
    history: M.
    horizon: H.
    latent_dim: size of z.
    head_hidden: width of the head's hidden layer.
    fused: PyTorch's fused kernels (True) or plain tensor ops that ``torch.func.vmap`` can
      batch (False); see the module docstring.
  """
  if name == "transformer":
    encoder: nn.Module = TransformerEncoder(latent_dim, history, fused=fused)
  elif name == "lstm":
    encoder = LSTMEncoder(latent_dim, fused=fused)
  else:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  return ViewportModel(encoder, Head(latent_dim, head_hidden, horizon))


def build_torch_generator(
  latent_dim: int = 32, *, noise_dim: int = 32, hidden: int = 256
) -> SimpleGenerator:
  """FedGen's simple generator with fedvp_jax's defaults (``FedGenConfig``)."""
  return SimpleGenerator(noise_dim, hidden, latent_dim)


# --- Parameters from fedvp_jax. ---


def _flatten_jax(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """``{"encoder.blocks.0.attention.query.kernel": array, ...}`` of a nested params dict."""
  flat: dict[str, np.ndarray] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten_jax(value, name + "."))
    else:
      flat[name] = np.asarray(value, np.float32)
  return flat


def _torch_entries(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
  """The torch state entries that one flax leaf becomes (names relative to the same module)."""
  module, _, leaf = name.rpartition(".")
  parent, _, layer = module.rpartition(".")
  if layer == "dense_i":
    # flax's cell has one bias, on dense_h; nn.LSTM's input bias stays zero.
    zeros = np.zeros(value.shape[1], np.float32)
    return {f"{parent}.weight_ih_l0": value.T, f"{parent}.bias_ih_l0": zeros}
  if layer == "dense_h":
    key, value = ("weight_hh_l0", value.T) if leaf == "kernel" else ("bias_hh_l0", value)
    return {f"{parent}.{key}": value}
  if parent.endswith("attention") and leaf == "kernel":
    # DenseGeneral kernels: q/k/v are [width, heads, depth], out is [heads, depth, width];
    # merge heads and depth into torch's one feature axis.
    split_out = layer == "out"
    value = value.reshape(-1, value.shape[-1]) if split_out else value.reshape(value.shape[0], -1)
  elif parent.endswith("attention") and leaf == "bias":
    value = value.reshape(-1)
  prefix = module + "." if module else ""
  renamed = {"kernel": ("weight", value.T), "scale": ("weight", value)}
  key, value = renamed.get(leaf, (leaf, value))
  return {prefix + key: value}


def jax_state_dict(module: nn.Module, jax_params: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
  """The torch state dict of ``module`` holding the values of ``jax_params``.

  Raises:
    ValueError: when the two do not have the same entries and shapes.
  """
  entries: dict[str, np.ndarray] = {}
  for name, value in _flatten_jax(jax_params).items():
    entries.update(_torch_entries(name, value))
  # The fused LSTM wraps nn.LSTM one level deeper than the flax cell.
  reference = module.state_dict()
  state: dict[str, torch.Tensor] = {}
  for name, value in entries.items():
    target = name
    if target not in reference and ".cell." in target:
      target = target.replace(".cell.", ".cell.lstm.")
    if target not in reference:
      raise ValueError(f"jax parameter {name!r} has no counterpart in {type(module).__name__}")
    if tuple(reference[target].shape) != value.shape:
      raise ValueError(f"{target}: torch shape {tuple(reference[target].shape)}, jax {value.shape}")
    state[target] = torch.from_numpy(np.array(value, np.float32, copy=True))
  missing = [k for k in reference if k not in state and not k.endswith("steps")]
  if missing:
    raise ValueError(f"no jax values for {', '.join(missing)}")
  return state


def load_from_jax(module: nn.Module, jax_params: Mapping[Any, Any]) -> nn.Module:
  """Copies a fedvp_jax params pytree (a viewport model's or a generator's) into ``module``.

  Args:
    module: from :func:`build_torch_model` (fused or not) or :func:`build_torch_generator`.
    jax_params: the nested dict from ``Model.init`` / ``Generator.init`` (jax or numpy leaves).

  Returns:
    ``module``, changed in place.
  """
  state = jax_state_dict(module, jax_params)
  with torch.no_grad():
    current = module.state_dict()
    for name, value in state.items():
      current[name].copy_(value)
  return module


def init_like_flax(module: nn.Module, seed: int = 0) -> nn.Module:
  """Re-initialises ``module`` the way flax initialises its fedvp_jax twin (in place).

  LeCun-normal kernels (truncated at two standard deviations), zero biases, LayerNorm 1/0,
  an orthogonal recurrent kernel, a zero last head layer and unit gains, so an untrained
  model is the constant-velocity predictor.
  """
  device = next(module.parameters()).device
  g = torch.Generator(device=device).manual_seed(seed)

  def lecun(weight: torch.Tensor, fan_in: int) -> None:
    # flax's truncated normal is rescaled so that the truncated draw has the wanted variance.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    torch.nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=g)

  with torch.no_grad():
    for sub in module.modules():
      if isinstance(sub, nn.Linear):
        lecun(sub.weight, sub.in_features)
        if sub.bias is not None:
          sub.bias.zero_()
      elif isinstance(sub, nn.LayerNorm):
        sub.weight.fill_(1.0)
        sub.bias.fill_(0.0)
      elif isinstance(sub, (LSTMLoop, nn.LSTM)):
        lecun(sub.weight_ih_l0, sub.weight_ih_l0.shape[1])
        torch.nn.init.orthogonal_(sub.weight_hh_l0, generator=g)
        sub.bias_hh_l0.zero_()
        sub.bias_ih_l0.zero_()
      elif isinstance(sub, TransformerEncoder):
        sub.position.copy_(0.02 * torch.randn(sub.position.shape, generator=g))
    # After the loop, which gave the head's last layer a LeCun kernel too.
    for sub in module.modules():
      if isinstance(sub, Head):
        sub.out.weight.zero_()
        sub.gain.fill_(1.0)
  return module


# --- Shared by both federations (torch_seed, torch_vmap): data, schedules, grid, labels. ---


class ClientTensors(NamedTuple):
  """fedvp_jax's ``ClientData`` as CPU tensors (same fields; ``*_mask`` bool).

  ``train_counts``: ``f32[clients]`` real train windows, the aggregation weights.
  """

  train_x: torch.Tensor
  train_y: torch.Tensor
  train_mask: torch.Tensor
  test_x: torch.Tensor
  test_y: torch.Tensor
  test_mask: torch.Tensor
  train_counts: torch.Tensor

  @property
  def num_clients(self) -> int:
    return self.train_x.shape[0]


def client_tensors(client_data: Any) -> ClientTensors:
  """Copies a fedvp_jax ``ClientData`` (or anything with its six array fields) to torch."""
  fields = ("train_x", "train_y", "train_mask", "test_x", "test_y", "test_mask")
  # On torch's default device, where the federations' models and random draws are too.
  device = torch.get_default_device()
  arrays = {
    name: torch.from_numpy(np.array(getattr(client_data, name))).to(device) for name in fields
  }
  counts = arrays["train_mask"].sum(dim=1).to(torch.float32)
  return ClientTensors(**arrays, train_counts=counts)


class RoundInputs(NamedTuple):
  """Everything random that the selected clients' local training consumes in one round.

  Drawn by ``sample_round_inputs``; a federation's ``round(inputs=...)`` takes them instead of
  drawing its own, so two implementations can train on identical batches.

  Attributes:
    selected: ``i64[K]`` clients that train, sorted.
    x: ``f32[K, S, B, M, 3]`` and ``y: f32[K, S, B, H, 3]`` minibatches.
    labels: ``f32[K, S, B_gen, 3]`` FedGen's labels (the clients' own final targets), or None.
    noise: ``f32[K, S, B_gen, noise_dim]`` generator noise for the labels, or None.
    latent_noise: ``f32[K, S, B, noise_dim]`` generator noise of the latent term, or None.
  """

  selected: torch.Tensor
  x: torch.Tensor
  y: torch.Tensor
  labels: torch.Tensor | None = None
  noise: torch.Tensor | None = None
  latent_noise: torch.Tensor | None = None


def make_rng(seed: int) -> torch.Generator:
  """The federations' random stream, on torch's default device."""
  return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def sample_indices(
  gen: torch.Generator, mask: torch.Tensor, num_steps: int, batch_size: int
) -> torch.Tensor:
  """``i64[K, S, B]``: each client walks a fresh permutation of its real windows, wrapping
  around (``fedvp_jax.data.federated.sample_indices``), all clients at once."""
  keys = torch.rand(mask.shape, generator=gen)
  order = torch.argsort(torch.where(mask, keys, 2.0), dim=1)
  count = mask.sum(dim=1).clamp(min=1)
  flat = torch.arange(num_steps * batch_size)
  idx = torch.gather(order, 1, flat[None, :] % count[:, None])
  return idx.reshape(mask.shape[0], num_steps, batch_size)


def sample_round_inputs(
  gen: torch.Generator,
  data: ClientTensors,
  selected: torch.Tensor,
  num_steps: int,
  batch_size: int,
  gen_batch_size: int = 0,
  noise_dim: int = 0,
  latent_term: bool = False,
) -> RoundInputs:
  """One round's minibatches (and FedGen's labels and noise when ``gen_batch_size > 0``)."""
  rows = selected[:, None, None]
  idx = sample_indices(gen, data.train_mask[selected], num_steps, batch_size)
  x, y = data.train_x[rows, idx], data.train_y[rows, idx]
  if not gen_batch_size:
    return RoundInputs(selected, x, y)
  label_idx = sample_indices(gen, data.train_mask[selected], num_steps, gen_batch_size)
  labels = data.train_y[rows, label_idx, -1]
  k = selected.shape[0]
  noise = torch.randn(k, num_steps, gen_batch_size, noise_dim, generator=gen)
  latent = torch.randn(k, num_steps, batch_size, noise_dim, generator=gen) if latent_term else None
  return RoundInputs(selected, x, y, labels, noise, latent)


def select_clients(gen: torch.Generator, num_clients: int, per_round: int | None) -> torch.Tensor:
  """``i64[K]`` sorted clients that train this round (all of them when ``per_round`` is None)."""
  if per_round is None or per_round == num_clients:
    return torch.arange(num_clients)
  return torch.sort(torch.randperm(num_clients, generator=gen)[:per_round]).values


SCHEDULE_DECAY = 0.98  # the generator's learning rate's, as fedvp_jax's


def generator_weights(fedgen: Any, round_index: int) -> tuple[float, float]:
  """``(alpha_t, beta_t)`` of a round, as ``fedvp_jax.algorithms.fedgen.generator_weights``."""
  start = max(fedgen.pretrain_rounds, 1)
  if round_index < start:
    return 0.0, 0.0
  t = round_index - start
  ramp = min(max((t + 1) / fedgen.gen_warmup, 0.0), 1.0) if fedgen.gen_warmup else 1.0

  def weight(initial: float) -> float:
    if initial == 0:
      return 0.0
    # float32 like the jax schedule, so that both see the same weights.
    decay = float(np.float32(fedgen.alpha_decay) ** np.float32(t))
    return max(fedgen.alpha_floor, initial * decay) * ramp

  return weight(fedgen.alpha), weight(fedgen.latent_weight)


def generator_learning_rate(fedgen: Any, steps_done: int) -> float:
  """G's learning rate after ``steps_done`` Adam steps (optax's staircase exponential decay)."""
  return fedgen.gen_learning_rate * SCHEDULE_DECAY ** (steps_done // fedgen.gen_steps)


def check_fedgen(fedgen: Any) -> None:
  """Only FedGen's simple generator on coordinates has a torch twin here."""
  if fedgen.generator != "simple" or fedgen.embedding:
    raise NotImplementedError("the torch federations implement the simple generator only")


def diversity_loss(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
  """FedGen's diversity loss ``exp(-mean_ij ||eps_i - eps_j||^2_mean * |z_i - z_j|_mean)``."""
  z_dist = torch.mean(torch.abs(z[:, None] - z[None]), dim=-1)
  noise_dist = torch.mean(torch.square(noise[:, None] - noise[None]), dim=-1)
  return torch.exp(torch.mean(-noise_dist * z_dist))


def window_squared_errors(
  prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
  """``(sum of window MSEs over real windows, number of real windows)``."""
  per_window = torch.mean(torch.square(prediction - target), dim=(-2, -1))
  weight = mask.to(per_window.dtype)
  return float(torch.sum(per_window * weight)), float(torch.sum(weight))


# The equirectangular grid of fedvp_jax.heatmap.grid: G longitude by G/2 latitude cells, rows
# north to south, columns east from the dateline; float64 numpy constants handed out as f32.


def cell_size(grain: int) -> float:
  return 2.0 * math.pi / grain


def lat_edges(grain: int) -> torch.Tensor:
  """``f32[G/2 + 1]`` row boundaries from pi/2 down to -pi/2."""
  return torch.tensor(
    math.pi / 2 - np.arange(grain // 2 + 1) * cell_size(grain), dtype=torch.float32
  )


def cell_centers(grain: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Longitudes ``f32[G]`` of column centres and latitudes ``f32[G/2]`` of row centres."""
  size = cell_size(grain)
  lon = -math.pi + (np.arange(grain) + 0.5) * size
  lat = math.pi / 2 - (np.arange(grain // 2) + 0.5) * size
  return torch.tensor(lon, dtype=torch.float32), torch.tensor(lat, dtype=torch.float32)


def row_areas(grain: int) -> torch.Tensor:
  """``f32[G/2]`` area of one cell of each row as a fraction of the sphere."""
  sin_edges = np.sin(math.pi / 2 - np.arange(grain // 2 + 1) * cell_size(grain))
  return torch.tensor((sin_edges[:-1] - sin_edges[1:]) / (2 * grain), dtype=torch.float32)


def lonlat_to_vec(lon: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
  cos_lat = torch.cos(lat)
  return torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)], dim=-1)


def vec_to_lonlat(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  v = normalize(v)
  return torch.atan2(v[..., 1], v[..., 0]), torch.asin(torch.clamp(v[..., 2], -1.0, 1.0))


def cell_index(points: torch.Tensor, grain: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Row and column ``i64[...]`` of the cell holding each point (``grid.cell_index``)."""
  size = cell_size(grain)
  lon, lat = vec_to_lonlat(points)
  col = torch.remainder(torch.floor((lon + math.pi) / size).long(), grain)
  row = torch.clamp(torch.floor((math.pi / 2 - lat) / size).long(), 0, grain // 2 - 1)
  return row, col


_EDGE_MARGIN = 1e-3
"""Fraction of a cell that sampled labels keep clear of its edges (fedvp_jax's)."""


def sample_labels(gen: torch.Generator, heat: torch.Tensor, num: int) -> torch.Tensor:
  """``f32[..., num, 3]`` viewpoints drawn from ``heat: f32[G/2, G]``: a cell by its mass, then
  a point uniform in area inside it. ``num`` may be a tuple ``(steps, n)``."""
  shape = (num,) if isinstance(num, int) else tuple(num)
  grain = heat.shape[-1]
  total = math.prod(shape)
  cells = torch.multinomial(heat.reshape(-1), total, replacement=True, generator=gen)
  row, col = cells // grain, cells % grain
  offset = _EDGE_MARGIN + (1 - 2 * _EDGE_MARGIN) * torch.rand(total, 2, generator=gen)
  lon = -math.pi + (col + offset[:, 0]) * cell_size(grain)
  sin_edges = torch.sin(lat_edges(grain))
  sin_lat = sin_edges[row] + offset[:, 1] * (sin_edges[row + 1] - sin_edges[row])
  return lonlat_to_vec(lon, torch.asin(sin_lat)).reshape(*shape, 3)


def label_weights(heat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """``f32[clients, ...]`` each client's share of the heatmap mass at each label's cell
  (equal shares where no client has mass), as ``fedvp_jax.heatmap.label_weights``."""
  row, col = cell_index(labels, heat.shape[-1])
  mass = heat[:, row, col]
  total = torch.sum(mass, dim=0)
  has_mass = total > torch.finfo(heat.dtype).tiny
  safe = torch.where(has_mass, total, torch.ones_like(total))
  return torch.where(has_mass, mass / safe, torch.full_like(mass, 1.0 / heat.shape[0]))


def combined(heat: torch.Tensor) -> torch.Tensor:
  """The pooled distribution ``f32[G/2, G]`` of every client's heatmap (sums to 1 or is 0)."""
  pooled = torch.sum(heat, dim=0)
  total = torch.sum(pooled)
  return pooled / torch.where(total > 0, total, torch.ones_like(total))


def flat_from_jax(module: nn.Module, jax_params: Mapping[Any, Any]) -> torch.Tensor:
  """``f32[P]``: ``jax_params`` in the order of ``module``'s trainable parameters (the layout
  of the federations' ``server_state()`` and ``client_state(k)``)."""
  state = jax_state_dict(module, jax_params)
  return torch.cat([state[n].reshape(-1) for n, p in module.named_parameters() if p.requires_grad])
