"""The fastest PyTorch federation here: every client's parameters in one ``f32[N, P]`` tensor,
local steps as ``torch.func.vmap(torch.func.grad_and_value(loss))`` over the clients axis,
aggregation and optimizers as tensor arithmetic, FedGen's heatmaps as one scatter-add and an
FFT blur, and the teacher loss vmapped over the clients' heads.

API (the same as ``torch_seed``):

* ``make_federation(client_data, model="transformer", algo="fedavg", optimizer="sgd",
  learning_rate=0.01, local_steps=10, batch_size=64, seed=0, send=None, beta=1.0,
  clients_per_round=None, eval_every=1, fedgen=None, init_params=None,
  generator_params=None, latent_dim=32, compile=False, **fedgen_overrides) -> VmapFederation``
  (see ``torch_seed`` for the arguments; ``compile=True`` wraps the local step in
  ``torch.compile``, see below).
* ``federation.round(inputs=None) -> dict``, ``federation.evaluate() -> float``,
  ``federation.sample_inputs() -> RoundInputs``, ``federation.server_state()``,
  ``federation.client_state(k)``, ``federation.generator_state()``: as in ``torch_seed``.
* ``heatmaps(points, grain, sigma_deg, mask=None, normalize=True) -> f32[clients, G/2, G]``:
  fedvp_jax's heatmaps (``fedvp_jax.heatmap.heatmaps``: bilinear splat, then the three-pass
  blur on one real FFT along longitude), the same numbers to float32 round-off.

What differs from fedvp_jax, and why:

* The model is built with ``fused=False`` (plain tensor ops): ``nn.LSTM`` and
  ``F.scaled_dot_product_attention`` have no vmap batching rule in torch 2.13 on CPU
  (``aten::mkldnn_rnn_layer``, ``aten::_scaled_dot_product_flash_attention_for_cpu``), so vmap
  would loop over clients one sample at a time.
* The generator is a constant during the clients' steps, so its outputs for every client and
  step are computed once per round, in one batched call, instead of inside each step: the
  same numbers, less work. Likewise the generator's labels and noise for all ``gen_steps``.
* Random draws come from a ``torch.Generator``; a client whose update is non-finite is left
  out of the average and keeps its pre-round model (as in fedvp_jax); the generator skips a
  step whose loss is non-finite (fedvp_jax checks the new params).

``torch.compile``: ``compile=True`` compiles the local step (vmapped grad and the optimizer
update) with the default inductor backend, which on CPU generates C++ and builds it with the
system compiler; torch.func transforms inside ``torch.compile`` work. It is off by default
because compiling is slow: on the 2 shared cores it was written on (David-m10-h1, 10 clients,
1 thread) the first round took 34 s (LSTM) to 52 s (Transformer), and FedGen compiles a
second step function when the generator switches on in round 1 (20-27 s); after that rounds
took about half the eager time (FedAvg: Transformer 0.92 s vs 1.76 s, LSTM 0.32 s vs 0.81 s;
FedGen: 1.10 s vs 2.26 s, 0.76 s vs 1.23 s). Inductor caches its output on disk (under
``/tmp/torchinductor_$USER``), so a later process compiles the same step faster.

Threads: on a busy machine set ``torch.set_num_threads(1)``. With 2 OpenMP threads on 2
cores shared with other processes, rounds were 5 to 20 times slower and erratic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch_models as tm
import torch_seed
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedvp_jax.config import FedGenConfig

# --- fedvp_jax's heatmaps. ---


def heatmaps(
  points: Any,
  grain: int,
  sigma_deg: float,
  mask: Any = None,
  normalize: bool = True,
) -> torch.Tensor:
  """fedvp_jax's Gaussian viewpoint heatmaps, all clients at once.

  Args:
    points: ``f32[clients, n, 3]`` unit viewpoints.
    grain: the grid's grain G.
    sigma_deg: the Gaussian's standard deviation in great-circle degrees.
    mask: ``bool[clients, n]``, False for points that must not count; None counts all.
    normalize: scale each client's heatmap to sum to 1; otherwise it sums to its point count.

  Returns:
    ``f32[clients, G/2, G]`` mass per cell.
  """
  points = torch.as_tensor(points, dtype=torch.float32, device=torch.get_default_device())
  weights = (
    torch.ones(points.shape[:-1])
    if mask is None
    else torch.as_tensor(mask, device=points.device).float()
  )
  mass = torch.clamp(_blur(_splat(points, weights, grain), grain, sigma_deg), min=0.0)
  if not normalize:
    return mass
  total = torch.sum(mass, dim=(-2, -1), keepdim=True)
  return mass / torch.where(total > 0, total, torch.ones_like(total))


def _splat(points: torch.Tensor, weights: torch.Tensor, grain: int) -> torch.Tensor:
  """Bilinear splat ``f32[C, G/2, G]`` of every client's points, one scatter-add for all."""
  clients = points.shape[0]
  rows = grain // 2
  size = tm.cell_size(grain)
  lon, lat = tm.vec_to_lonlat(points)
  x = (lon + math.pi) / size - 0.5
  y = torch.clamp((math.pi / 2 - lat) / size - 0.5, 0.0, rows - 1)
  col = torch.floor(x)
  row = torch.clamp(torch.floor(y), max=rows - 2)
  frac_x, frac_y = x - col, y - row
  share_y = torch.stack([1.0 - frac_y, frac_y], dim=-1)
  share_x = torch.stack([1.0 - frac_x, frac_x], dim=-1)
  share = weights[..., None, None] * share_y[..., :, None] * share_x[..., None, :]
  corner = torch.arange(2)
  row_idx = row.long()[..., None, None] + corner[:, None]
  col_idx = torch.remainder(col.long()[..., None, None] + corner[None, :], grain)
  client = torch.arange(clients).reshape(clients, *([1] * (row_idx.dim() - 1)))
  flat = (client * rows + row_idx) * grain + col_idx
  out = torch.zeros(clients * rows * grain)
  out.index_add_(0, flat.reshape(-1), share.reshape(-1))
  return out.reshape(clients, rows, grain)


def _blur(counts: torch.Tensor, grain: int, sigma_deg: float) -> torch.Tensor:
  """fedvp_jax's three-pass blur (see ``fedvp_jax/heatmap/gaussian.py``)."""
  source_kernel, target_kernel, mixing = _blur_constants(grain, float(sigma_deg))
  spectrum = torch.fft.rfft(counts, dim=-1) * source_kernel
  # A real matrix times a complex array: two real products.
  spectrum = torch.complex(
    torch.einsum("ir,crk->cik", mixing, spectrum.real),
    torch.einsum("ir,crk->cik", mixing, spectrum.imag),
  )
  return torch.fft.irfft(spectrum * target_kernel, n=grain, dim=-1)


@functools.lru_cache(maxsize=16)
def _blur_constants(grain: int, sigma_deg: float) -> tuple[torch.Tensor, ...]:
  """The blur's kernel spectra and row mixing, which depend only on the grid and sigma (XLA
  folds them into constants under jit; here they are cached)."""
  size = tm.cell_size(grain)
  _, lat = tm.cell_centers(grain)
  cos_lat = torch.cos(lat)
  var = torch.square(torch.deg2rad(torch.tensor(sigma_deg, dtype=torch.float32)))
  splat_var = size**2 / 6
  lat_var = torch.maximum(var - splat_var, var / 2)
  source_var = torch.maximum(var / 2 - torch.square(cos_lat) * splat_var, var / 4)
  kernels = _lon_kernel_spectra(
    cos_lat, grain, torch.stack([source_var, (var / 2).expand(cos_lat.shape)])
  )
  return kernels[0], kernels[1], _row_mixing(lat, cos_lat, grain, lat_var, var)


def _lon_kernel_spectra(cos_lat: torch.Tensor, grain: int, var: torch.Tensor) -> torch.Tensor:
  """Real spectra ``f32[..., G/2, G/2 + 1]`` of the rows' circular longitude kernels."""
  steps = torch.arange(grain)
  dlon = torch.minimum(steps, grain - steps).float() * tm.cell_size(grain)
  arc = 2.0 * torch.asin(cos_lat[:, None] * torch.sin(dlon / 2))
  kernel = torch.exp(-torch.square(arc) / (2.0 * var[..., None]))
  kernel = kernel / torch.sum(kernel, dim=-1, keepdim=True)
  return torch.fft.rfft(kernel, dim=-1).real


def _row_mixing(
  lat: torch.Tensor, cos_lat: torch.Tensor, grain: int, lat_var: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
  """``f32[G/2, G/2]``: the share of row r's mass sent to row i, columns summing to 1."""
  area = tm.row_areas(grain)
  dlat = lat[:, None] - lat[None, :]
  share = (
    area[:, None]
    * torch.exp(-torch.square(dlat) / (2.0 * lat_var))
    * torch.special.i0e(cos_lat[:, None] * cos_lat[None, :] / var)
  )
  return share / torch.sum(share, dim=0, keepdim=True)


# --- The federation. ---


class FlatParams:
  """The trainable parameters of a module as slices of one flat vector ``f32[..., P]``."""

  def __init__(self, module: nn.Module):
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    self.names = [n for n, _ in named]
    self.shapes = [tuple(p.shape) for _, p in named]
    self.sizes = [p.numel() for _, p in named]
    self.size = sum(self.sizes)
    self.initial = torch.cat([p.detach().reshape(-1) for _, p in named])
    # The head's parameters come last (the encoder is registered first): one slice.
    head = [i for i, n in enumerate(self.names) if n.startswith("head.")]
    self.head_start = sum(self.sizes[: head[0]]) if head else self.size
    if head and head != list(range(head[0], len(self.names))):
      raise ValueError("the head's parameters must come last")

  def unflatten(self, flat: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{name: f32[..., *shape]}`` views of ``flat: f32[..., P]`` (names under ``prefix``)."""
    batch = flat.shape[:-1]
    chunks = torch.split(flat, self.sizes, dim=-1)
    return {
      n[len(prefix) :]: c.reshape(*batch, *s)
      for n, s, c in zip(self.names, self.shapes, chunks, strict=True)
      if n.startswith(prefix)
    }


class VmapFederation:
  """FedAvg / FedGen with the clients as one batched axis (see the module doc)."""

  def __init__(
    self,
    data: tm.ClientTensors,
    model: str,
    algo: str,
    optimizer: str,
    learning_rate: float,
    local_steps: int,
    batch_size: int,
    seed: int,
    send: str,
    beta: float,
    clients_per_round: int | None,
    eval_every: int,
    fedgen: FedGenConfig,
    init_params: Any,
    generator_params: Any,
    latent_dim: int,
    compile: bool,
  ):
    if algo not in ("fedavg", "fedgen"):
      raise ValueError(f"unknown algo {algo!r}")
    if optimizer not in ("sgd", "adam"):
      raise ValueError(f"unknown optimizer {optimizer!r}")
    self.data, self.algo = data, algo
    self.optimizer, self.learning_rate = optimizer, learning_rate
    self.local_steps, self.batch_size = local_steps, batch_size
    self.send, self.beta = send, beta
    self.clients_per_round, self.eval_every = clients_per_round, eval_every
    self.fedgen = fedgen
    self.rng = tm.make_rng(seed)
    self.round_index = 0
    history, horizon = data.train_x.shape[2], data.train_y.shape[2]
    self.model = tm.build_torch_model(model, history, horizon, latent_dim=latent_dim, fused=False)
    if init_params is not None:
      tm.load_from_jax(self.model, init_params)
    else:
      tm.init_like_flax(self.model, seed)
    self.layout = FlatParams(self.model)
    # The module's own tensors are only a template for functional_call.
    self.model.requires_grad_(False)
    n = data.num_clients
    self.server = self.layout.initial.clone()
    self.clients = self.server.expand(n, -1).clone()
    # Adam's moments and step counts, per client (never averaged, like a torch optimizer
    # created once per user); SGD has none.
    self.moments = (torch.zeros_like(self.clients), torch.zeros_like(self.clients))
    self.counts = torch.zeros(n)
    self.generator = None
    if algo == "fedgen":
      tm.check_fedgen(fedgen)
      self.generator = tm.build_torch_generator(
        self.model.head.hidden.in_features,
        noise_dim=fedgen.noise_dim,
        hidden=fedgen.generator_hidden,
      )
      if generator_params is not None:
        tm.load_from_jax(self.generator, generator_params)
      else:
        tm.init_like_flax(self.generator, seed + 1)
      self.generator_optimizer = torch.optim.Adam(
        self.generator.parameters(), lr=fedgen.gen_learning_rate, eps=1e-8
      )
      self.generator_steps_done = 0
    self._step_fns: dict[tuple[bool, bool], Callable[..., Any]] = {}
    self.compile = compile
    self._predict = vmap(self._apply)

  # --- Pure functions of flat params. ---

  def _apply(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return functional_call(self.model, self.layout.unflatten(flat), (x,))

  def _head(self, head: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The head with parameters ``head`` (names relative to it, from ``unflatten(.., "head.")``)."""
    return functional_call(self.model.head, head, (z,))

  def _loss(self, generator_term: bool, latent_term: bool) -> Callable[..., torch.Tensor]:
    """One client's loss on one step's inputs (see ``fedgen_client_loss``)."""

    def loss(flat, x, y, z_gen, labels, z_latent, alpha, latent_weight):
      prediction = self._apply(flat, x)
      value = tm.mse(prediction, y)
      if not generator_term:
        return value
      head = self.layout.unflatten(flat, "head.")
      extra = alpha * tm.mse(self._head(head, z_gen)[:, -1], labels)
      if latent_term:
        target = self._head(head, z_latent)[:, -1].detach()
        extra = extra + latent_weight * tm.mse(prediction[:, -1], target)
      return value + extra

    return loss

  def _step_fn(self, generator_term: bool, latent_term: bool) -> Callable[..., Any]:
    """The vmapped step ``(flat, m, v, count, inputs...) -> (flat, m, v, loss)``, cached."""
    key = (generator_term, latent_term)
    if key in self._step_fns:
      return self._step_fns[key]
    g = 0 if generator_term else None
    grads = vmap(
      grad_and_value(self._loss(generator_term, latent_term)),
      # Inputs a loss does not use are None, which vmap must not map.
      in_dims=(0, 0, 0, g, g, 0 if latent_term else None, None, None),
    )
    lr, adam = self.learning_rate, self.optimizer == "adam"
    b1, b2, eps = 0.9, 0.999, 1e-8

    def step(flat, m, v, count, x, y, z_gen, labels, z_latent, alpha, latent_weight):
      g, loss = grads(flat, x, y, z_gen, labels, z_latent, alpha, latent_weight)
      if not adam:
        return flat - lr * g, m, v, loss
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * torch.square(g)
      m_hat = m / (1 - b1**count)[:, None]
      v_hat = v / (1 - b2**count)[:, None]
      return flat - lr * (m_hat / (torch.sqrt(v_hat) + eps)), m, v, loss

    if self.compile:
      step = torch.compile(step, dynamic=False)
    self._step_fns[key] = step
    return step

  # --- Server and clients. ---

  def _receive(self, server: torch.Tensor, clients: torch.Tensor) -> torch.Tensor:
    """Every client's params after taking what the server sends (``aggregation.receive``)."""
    if self.send == "none":
      return clients
    start = 0 if self.send == "full" else self.layout.head_start
    out = clients.clone()
    out[:, start:] = self.beta * server[start:] + (1.0 - self.beta) * clients[:, start:]
    return out

  def _test_loss(self, params: torch.Tensor) -> float:
    with torch.no_grad():
      prediction = self._predict(params, self.data.test_x)
    total, count = tm.window_squared_errors(prediction, self.data.test_y, self.data.test_mask)
    return total / max(count, 1.0)

  def evaluate(self) -> float:
    """The Average Global Loss of the deployed models."""
    return self._test_loss(self._receive(self.server, self.clients))

  def sample_inputs(self) -> tm.RoundInputs:
    """The batches, labels and noise of one round, for ``round(inputs=...)``."""
    cfg = self.fedgen
    selected = tm.select_clients(self.rng, self.data.num_clients, self.clients_per_round)
    return tm.sample_round_inputs(
      self.rng,
      self.data,
      selected,
      self.local_steps,
      self.batch_size,
      cfg.gen_batch_size if self.generator is not None else 0,
      cfg.noise_dim,
      cfg.latent_weight > 0,
    )

  def round(self, inputs: tm.RoundInputs | None = None) -> dict[str, Any]:
    """One synchronous round (see ``torch_seed``'s module doc)."""
    self.clients = self._receive(self.server, self.clients)
    test_loss = self._test_loss(self.clients) if self.round_index % self.eval_every == 0 else None
    if inputs is None:
      inputs = self.sample_inputs()
    selected = inputs.selected
    everyone = selected.shape[0] == self.data.num_clients
    alpha, latent_weight = (
      tm.generator_weights(self.fedgen, self.round_index)
      if self.generator is not None
      else (0.0, 0.0)
    )
    generator_term = self.generator is not None and (alpha > 0 or latent_weight > 0)
    latent_term = generator_term and self.fedgen.latent_weight > 0

    z_gen = z_latent = None
    if generator_term:
      with torch.no_grad():
        z_gen = self.generator(inputs.noise, inputs.labels)
        if latent_term:
          z_latent = self.generator(inputs.latent_noise, inputs.y[..., -1, :])
    start = self.clients if everyone else self.clients[selected]
    flat = start
    start_m, start_v = (
      self.moments if everyone else (self.moments[0][selected], self.moments[1][selected])
    )
    start_count = self.counts if everyone else self.counts[selected]
    m, v, count = start_m, start_v, start_count
    step = self._step_fn(generator_term, latent_term)
    # Tensors, not floats: torch.compile would specialise on (and recompile for) every
    # round's decayed weight.
    weights_t = torch.tensor([alpha, latent_weight])
    losses = []
    for s in range(self.local_steps):
      count = count + 1
      flat, m, v, loss = step(
        flat,
        m,
        v,
        count,
        inputs.x[:, s],
        inputs.y[:, s],
        z_gen[:, s] if generator_term else None,
        inputs.labels[:, s] if generator_term else None,
        z_latent[:, s] if latent_term else None,
        weights_t[0],
        weights_t[1],
      )
      losses.append(loss)
    losses_t = torch.stack(losses, dim=1)
    finite = torch.isfinite(flat).all(dim=1) & torch.isfinite(losses_t).all(dim=1)
    keep = finite[:, None]
    new_clients = torch.where(keep, flat, start)
    new_m = torch.where(keep, m, start_m)
    new_v = torch.where(keep, v, start_v)
    new_count = torch.where(finite, count, start_count)
    if everyone:
      self.clients, self.moments, self.counts = new_clients, (new_m, new_v), new_count
    else:
      self.clients[selected] = new_clients
      self.moments[0][selected], self.moments[1][selected] = new_m, new_v
      self.counts[selected] = new_count

    weights = torch.where(finite, self.data.train_counts[selected], 0.0)
    total = float(weights.sum())
    train_loss = float((weights * losses_t.mean(dim=1)).sum()) / total if total else math.nan
    metrics: dict[str, Any] = {"train_loss": train_loss, "test_loss": test_loss}
    if self.generator is not None:
      uploaded = inputs.y[..., -1, :].reshape(selected.shape[0], -1, 3)
      teacher, diversity = self._train_generator(flat, finite, uploaded)
      metrics.update(generator_weight=alpha, teacher_loss=teacher, diversity_loss=diversity)
    if total:
      # Zero the excluded clients first: their weight is 0, but 0 * NaN is NaN.
      cleaned = torch.where(keep, flat, 0.0)
      self.server = (weights / total) @ cleaned
    self.round_index += 1
    return metrics

  def _train_generator(
    self, trained: torch.Tensor, usable: torch.Tensor, uploaded: torch.Tensor
  ) -> tuple[float, float]:
    """The server's generator steps against the trained clients' heads, all heads at once."""
    cfg, gen = self.fedgen, self.generator
    if not bool(usable.any()):
      return math.nan, math.nan
    heat = heatmaps(uploaded, cfg.grain, cfg.heatmap_sigma, normalize=False)
    heat = heat * usable[:, None, None]
    batch = cfg.server_batch_size or self.batch_size
    labels = tm.sample_labels(self.rng, tm.combined(heat), (cfg.gen_steps, batch))
    weights = tm.label_weights(heat, labels)  # [K, steps, n]
    noise = torch.randn(cfg.gen_steps, batch, cfg.noise_dim, generator=self.rng)
    heads = self.layout.unflatten(torch.where(usable[:, None], trained, 0.0), "head.")
    all_heads = vmap(self._head, in_dims=(0, None))
    teachers, diversities = [], []
    for s in range(cfg.gen_steps):
      z = gen(noise[s], labels[s])
      final = all_heads(heads, z)[:, :, -1]  # [K, n, 3]
      error = torch.sum(torch.square(final - labels[s]), dim=-1)
      error = torch.where(usable[:, None], error, 0.0)
      teacher = torch.sum(torch.mean(weights[:, s] * error, dim=1))
      diversity = tm.diversity_loss(noise[s], z)
      loss = teacher + cfg.diversity_weight * diversity
      teachers.append(teacher.detach())
      diversities.append(diversity.detach())
      if not bool(torch.isfinite(loss)):
        continue
      for group in self.generator_optimizer.param_groups:
        group["lr"] = tm.generator_learning_rate(cfg, self.generator_steps_done)
      self.generator_optimizer.zero_grad()
      loss.backward()
      self.generator_optimizer.step()
      self.generator_steps_done += 1
    return float(torch.stack(teachers).mean()), float(torch.stack(diversities).mean())

  # --- For comparisons. ---

  def server_state(self) -> torch.Tensor:
    """The server's trainable parameters as one flat vector (``named_parameters`` order)."""
    return self.server.clone()

  def client_state(self, k: int) -> torch.Tensor:
    """Client k's trainable parameters as one flat vector."""
    return self.clients[k].clone()

  def generator_state(self) -> torch.Tensor:
    """G's parameters as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in self.generator.parameters()])


def make_federation(
  client_data: Any,
  model: str = "transformer",
  algo: str = "fedavg",
  optimizer: str = "sgd",
  learning_rate: float = 0.01,
  local_steps: int = 10,
  batch_size: int = 64,
  seed: int = 0,
  send: str | None = None,
  beta: float = 1.0,
  clients_per_round: int | None = None,
  eval_every: int = 1,
  fedgen: FedGenConfig | None = None,
  init_params: Any = None,
  generator_params: Any = None,
  latent_dim: int = 32,
  compile: bool = False,
  **fedgen_overrides: Any,
) -> VmapFederation:
  """A vmapped federation over fedvp_jax's ``ClientData`` (see the module doc)."""
  return VmapFederation(
    tm.client_tensors(client_data),
    model,
    algo,
    optimizer,
    learning_rate,
    local_steps,
    batch_size,
    seed,
    send or "full",
    beta,
    clients_per_round,
    eval_every,
    torch_seed.resolve_fedgen(fedgen, fedgen_overrides),
    init_params,
    generator_params,
    latent_dim,
    compile,
  )
