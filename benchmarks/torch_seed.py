"""The researcher's PyTorch style (FedGen, ICML 2021 codebase): one model and one optimizer per
user, Python loops over users, steps, and — for FedGen's label heatmaps — viewpoints.

API (the same in ``torch_vmap``):

* ``make_federation(client_data, model="transformer", algo="fedavg", optimizer="sgd",
  learning_rate=0.01, local_steps=10, batch_size=64, seed=0, send=None, beta=1.0,
  clients_per_round=None, eval_every=1, fedgen=None, init_params=None,
  generator_params=None, latent_dim=32, **fedgen_overrides) -> SeedStyleFederation``.
  ``client_data`` is fedvp_jax's ``ClientData``; ``algo`` is ``"fedavg"`` or ``"fedgen"``
  (``send`` defaults to ``"full"``; pass ``"partial"``/``"none"`` for the partial and local
  variants); ``fedgen`` is a ``fedvp_jax.algorithms.FedGenConfig`` (its defaults when None),
  ``fedgen_overrides`` replace its fields (``gen_steps=5``...). ``init_params`` /
  ``generator_params`` are fedvp_jax params pytrees to start from (e.g. ``Model.init(key)``);
  without them the torch modules get flax-like initialisers seeded by ``seed``.
* ``federation.round(inputs=None) -> dict``: one synchronous round — receive, evaluate the
  deployed models (every ``eval_every`` rounds, at the start of the round, as fedvp_jax does),
  ``local_steps`` minibatch steps per selected user, [FedGen: heatmaps, generator steps],
  sample-weighted aggregation. Returns ``{"train_loss", "test_loss" (or None), ...}``.
  ``inputs`` (a ``torch_models.RoundInputs``) replaces the round's own random draws of
  batches, labels and noise.
* ``federation.evaluate() -> float``: the Average Global Loss, the test MSE of the deployed
  models (each user's model after receiving the server's) over every real test window.
* ``federation.sample_inputs() -> RoundInputs``: the draws a round would make.
* ``federation.server_state()``, ``federation.client_state(k)``,
  ``federation.generator_state()``: flat ``f32[P]`` vectors of the trainable parameters in
  ``named_parameters`` order (``torch_models.flat_from_jax`` gives jax params in this layout).
* ``federation.round_index``: rounds done; FedGen's schedules read it.
* ``heatmaps(points, grain, sigma_deg, normalize=True) -> f32[clients, G/2, G]``: the exact
  spherical-Gaussian heatmap, one viewpoint at a time (fedvp_jax's ``tests/test_heatmap.py``
  reference, in torch), each viewpoint contributing mass 1.

The modules import each other as top-level modules (``import torch_models``): put
``benchmarks/`` on ``sys.path``, as running ``python benchmarks/<script>.py`` does.

The users' models use PyTorch's fused kernels (``nn.LSTM``, ``F.scaled_dot_product_attention``),
as a PyTorch researcher would write them. The generator's server steps use
``server_batch_size or batch_size`` (64) labels, as fedvp_jax's ``fedgen`` does;
``gen_batch_size`` (256) is the clients' number of generated labels per local step.

What differs from fedvp_jax, and why:

* The heatmaps are the exact Gaussian per viewpoint, which fedvp_jax approximates (bilinear
  splat and a three-pass blur; total-variation distance about 0.015 at grain 128, sigma 5,
  see ``fedvp_jax/heatmap/gaussian.py``); so FedGen's label distribution and label weights
  differ by that much. ``torch_vmap`` reproduces fedvp_jax's approximation instead.
* Random draws (batches, labels, noise) come from a ``torch.Generator``, not jax keys.
* A user whose update is non-finite is left out of the average, as in fedvp_jax, but keeps
  its diverged model, as a FedGen user would (fedvp_jax restores the pre-round one); the
  generator skips a step whose loss is non-finite (fedvp_jax checks the new params).
* The generator's forward passes inside a user's loss run under ``no_grad`` (it is a constant
  there, as in fedvp_jax); FedGen's code also backpropagates into the generator and discards
  the gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch_models as tm
from torch import nn

from fedvp_jax.config import FedGenConfig


def heatmaps(points: Any, grain: int, sigma_deg: float, normalize: bool = True) -> torch.Tensor:
  """Every client's Gaussian viewpoint heatmap, adding one viewpoint's Gaussian at a time.

  Args:
    points: ``f32[clients, n, 3]`` unit viewpoints (tensor or array).
    grain: the grid's grain G.
    sigma_deg: the Gaussian's standard deviation in great-circle degrees.
    normalize: scale each client's heatmap to sum to 1; otherwise each viewpoint adds mass 1.

  Returns:
    ``f32[clients, G/2, G]`` mass per cell.
  """
  points = torch.as_tensor(points, dtype=torch.float32, device=torch.get_default_device())
  lon, lat = tm.cell_centers(grain)
  lat, lon = torch.meshgrid(lat, lon, indexing="ij")
  centers = tm.lonlat_to_vec(lon, lat)  # [G/2, G, 3]
  areas = tm.row_areas(grain)[:, None].expand(grain // 2, grain)
  two_var = 2.0 * math.radians(sigma_deg) ** 2
  out = []
  for client in points:
    mass = torch.zeros(grain // 2, grain)
    for point in client:
      p = point / torch.linalg.vector_norm(point)
      dist = torch.atan2(
        torch.linalg.vector_norm(torch.linalg.cross(centers, p.expand_as(centers)), dim=-1),
        centers @ p,
      )
      gaussian = torch.exp(-torch.square(dist) / two_var) * areas
      mass += gaussian / gaussian.sum()
    if normalize:
      mass = mass / torch.clamp(mass.sum(), min=torch.finfo(mass.dtype).tiny)
    out.append(mass)
  return torch.stack(out)


class User:
  """One client: its model, its optimizer, and its real windows."""

  def __init__(
    self,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
  ):
    self.model = model
    self.optimizer = optimizer
    self.train_x, self.train_y = train_x, train_y
    self.test_x, self.test_y = test_x, test_y
    self.train_samples = train_x.shape[0]


class SeedStyleFederation:
  """FedAvg / FedGen as FedGen's codebase runs them: objects and loops (see module doc)."""

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
  ):
    if algo not in ("fedavg", "fedgen"):
      raise ValueError(f"unknown algo {algo!r}")
    self.data = data
    self.algo = algo
    self.local_steps, self.batch_size = local_steps, batch_size
    self.send, self.beta = send, beta
    self.clients_per_round, self.eval_every = clients_per_round, eval_every
    self.fedgen = fedgen
    self.rng = tm.make_rng(seed)
    self.round_index = 0
    history, horizon = data.train_x.shape[2], data.train_y.shape[2]
    make = lambda: tm.build_torch_model(model, history, horizon, latent_dim=latent_dim, fused=True)
    self.server = make()
    if init_params is not None:
      tm.load_from_jax(self.server, init_params)
    else:
      tm.init_like_flax(self.server, seed)
    # A scratch model for evaluate(), which must not change any user's model.
    self.scratch = make()
    self.users = []
    for k in range(data.num_clients):
      user_model = make()
      user_model.load_state_dict(self.server.state_dict())
      trainable = [p for p in user_model.parameters() if p.requires_grad]
      opt = (
        torch.optim.SGD(trainable, lr=learning_rate)
        if optimizer == "sgd"
        else torch.optim.Adam(trainable, lr=learning_rate, eps=1e-8)
      )
      train, test = data.train_mask[k], data.test_mask[k]
      self.users.append(
        User(
          user_model,
          opt,
          data.train_x[k][train],
          data.train_y[k][train],
          data.test_x[k][test],
          data.test_y[k][test],
        )
      )
    self.generator = None
    if algo == "fedgen":
      tm.check_fedgen(fedgen)
      self.generator = tm.build_torch_generator(
        self.server.head.hidden.in_features,
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

  # --- What the server sends. ---

  def _received(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(user parameter, server parameter) pairs of the layers the server sends."""
    if self.send == "none":
      return []
    prefix = "head." if self.send == "partial" else ""
    server = dict(self.server.named_parameters())
    return [(p, server[n]) for n, p in model.named_parameters() if n.startswith(prefix)]

  def _receive(self, model: nn.Module) -> None:
    with torch.no_grad():
      for own, server in self._received(model):
        if self.beta == 1.0:
          own.copy_(server)
        else:
          own.mul_(1.0 - self.beta).add_(server, alpha=self.beta)

  # --- Evaluation. ---

  def _test_errors(self, model: nn.Module, user: User) -> tuple[float, float]:
    with torch.no_grad():
      prediction = model(user.test_x)
    ones = torch.ones(user.test_x.shape[0], dtype=torch.bool)
    return tm.window_squared_errors(prediction, user.test_y, ones)

  def evaluate(self) -> float:
    """The Average Global Loss of the deployed models."""
    total, count = 0.0, 0.0
    for user in self.users:
      self.scratch.load_state_dict(user.model.state_dict())
      self._receive(self.scratch)
      s, n = self._test_errors(self.scratch, user)
      total, count = total + s, count + n
    return total / max(count, 1.0)

  # --- A round. ---

  def _select(self) -> list[int]:
    return tm.select_clients(self.rng, len(self.users), self.clients_per_round).tolist()

  def _draw(self, user: User, num: int) -> torch.Tensor:
    """``i64[S, num]`` indices: a fresh permutation of the user's windows, wrapping around."""
    perm = torch.randperm(user.train_samples, generator=self.rng)
    return perm[torch.arange(self.local_steps * num) % user.train_samples].reshape(
      self.local_steps, num
    )

  def sample_inputs(self) -> tm.RoundInputs:
    """The batches, labels and noise of one round, for ``round(inputs=...)``."""
    cfg = self.fedgen
    return tm.sample_round_inputs(
      self.rng,
      self.data,
      tm.select_clients(self.rng, len(self.users), self.clients_per_round),
      self.local_steps,
      self.batch_size,
      cfg.gen_batch_size if self.generator is not None else 0,
      cfg.noise_dim,
      cfg.latent_weight > 0,
    )

  def _train_user(
    self, user: User, k: int, inputs: tm.RoundInputs | None, alpha: float, latent_weight: float
  ) -> tuple[float, torch.Tensor]:
    """``local_steps`` steps; returns the mean step loss and the final targets it saw."""
    model, opt, cfg = user.model, user.optimizer, self.fedgen
    use_generator = self.generator is not None and (alpha > 0 or latent_weight > 0)
    if inputs is None:
      idx = self._draw(user, self.batch_size)
      if self.generator is not None:
        label_idx = self._draw(user, cfg.gen_batch_size)
    model.train()
    losses = []
    targets = []
    for step in range(self.local_steps):
      if inputs is None:
        x, y = user.train_x[idx[step]], user.train_y[idx[step]]
      else:
        x, y = inputs.x[k, step], inputs.y[k, step]
      targets.append(y[:, -1])
      opt.zero_grad()
      prediction = model(x)
      loss = tm.mse(prediction, y)
      if use_generator:
        if inputs is None:
          labels = user.train_y[label_idx[step], -1]
          noise = torch.randn(labels.shape[0], cfg.noise_dim, generator=self.rng)
        else:
          labels, noise = inputs.labels[k, step], inputs.noise[k, step]
        with torch.no_grad():
          z = self.generator(noise, labels)
        extra = alpha * tm.mse(model.head(z)[:, -1], labels)
        if cfg.latent_weight > 0:
          if inputs is None:
            latent_noise = torch.randn(x.shape[0], cfg.noise_dim, generator=self.rng)
          else:
            latent_noise = inputs.latent_noise[k, step]
          with torch.no_grad():
            target = model.head(self.generator(latent_noise, y[:, -1]))[:, -1]
          extra = extra + latent_weight * tm.mse(prediction[:, -1], target)
        loss = loss + extra
      loss.backward()
      opt.step()
      losses.append(loss.detach())
    return float(torch.stack(losses).mean()), torch.cat(targets)

  def round(self, inputs: tm.RoundInputs | None = None) -> dict[str, Any]:
    """One synchronous round (see the module doc)."""
    for user in self.users:
      self._receive(user.model)
    test_loss = None
    if self.round_index % self.eval_every == 0:
      total, count = 0.0, 0.0
      for user in self.users:
        s, n = self._test_errors(user.model, user)
        total, count = total + s, count + n
      test_loss = total / max(count, 1.0)

    selected = inputs.selected.tolist() if inputs is not None else self._select()
    alpha, latent_weight = (
      tm.generator_weights(self.fedgen, self.round_index)
      if self.generator is not None
      else (0.0, 0.0)
    )
    losses, uploads, used = [], [], []
    for k, i in enumerate(selected):
      loss, targets = self._train_user(self.users[i], k, inputs, alpha, latent_weight)
      finite = math.isfinite(loss) and all(
        bool(torch.isfinite(p).all()) for p in self.users[i].model.parameters()
      )
      losses.append(loss)
      uploads.append(targets)
      used.append(finite)
    weights = [
      self.users[i].train_samples if ok else 0 for i, ok in zip(selected, used, strict=True)
    ]
    total = sum(weights)
    train_loss = (
      sum(w * lo for w, lo in zip(weights, losses, strict=True)) / total if total else math.nan
    )
    metrics: dict[str, Any] = {"train_loss": train_loss, "test_loss": test_loss}
    if self.generator is not None:
      teacher, diversity = self._train_generator(selected, uploads, used)
      metrics.update(generator_weight=alpha, teacher_loss=teacher, diversity_loss=diversity)
    self._aggregate(selected, weights)
    self.round_index += 1
    return metrics

  def _aggregate(self, selected: list[int], weights: list[int]) -> None:
    """FedGen's ``aggregate_parameters``: zero the server, add each user's share."""
    total = sum(weights)
    if not total:
      return
    with torch.no_grad():
      for p in self.server.parameters():
        p.zero_()
      for i, w in zip(selected, weights, strict=True):
        if not w:
          continue
        for server, own in zip(
          self.server.parameters(), self.users[i].model.parameters(), strict=True
        ):
          server.add_(own, alpha=w / total)

  def _train_generator(
    self, selected: list[int], uploads: list[torch.Tensor], used: list[bool]
  ) -> tuple[float, float]:
    """The server's generator steps on the uploaded labels' heatmaps (fedvp_jax's fedgen)."""
    cfg, gen = self.fedgen, self.generator
    heat = heatmaps(torch.stack(uploads), cfg.grain, cfg.heatmap_sigma, normalize=False)
    heat = heat * torch.tensor(used, dtype=torch.float32)[:, None, None]
    pool = tm.combined(heat)
    batch = cfg.server_batch_size or self.batch_size
    teachers, diversities = [], []
    for _ in range(cfg.gen_steps):
      if not any(used):
        break
      labels = tm.sample_labels(self.rng, pool, batch)
      weights = tm.label_weights(heat, labels)
      noise = torch.randn(batch, cfg.noise_dim, generator=self.rng)
      z = gen(noise, labels)
      teacher = torch.zeros(())
      for k, i in enumerate(selected):
        if not used[k]:
          continue
        final = self.users[i].model.head(z)[:, -1]
        error = torch.sum(torch.square(final - labels), dim=-1)
        teacher = teacher + torch.mean(weights[k] * error)
      diversity = tm.diversity_loss(noise, z)
      loss = teacher + cfg.diversity_weight * diversity
      teachers.append(float(teacher.detach()))
      diversities.append(float(diversity.detach()))
      if not math.isfinite(float(loss.detach())):
        continue
      for group in self.generator_optimizer.param_groups:
        group["lr"] = tm.generator_learning_rate(cfg, self.generator_steps_done)
      self.generator_optimizer.zero_grad()
      loss.backward()
      self.generator_optimizer.step()
      self.generator_steps_done += 1
    mean = lambda values: sum(values) / len(values) if values else math.nan
    return mean(teachers), mean(diversities)

  # --- For comparisons. ---

  def server_state(self) -> torch.Tensor:
    """The server's trainable parameters as one flat vector (``named_parameters`` order)."""
    return _flat(self.server)

  def client_state(self, k: int) -> torch.Tensor:
    """User k's trainable parameters as one flat vector."""
    return _flat(self.users[k].model)

  def generator_state(self) -> torch.Tensor:
    """G's parameters as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in self.generator.parameters()])


def _flat(module: nn.Module) -> torch.Tensor:
  """Trainable parameters (not nn.LSTM's frozen input bias) as one flat vector."""
  return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


def resolve_fedgen(fedgen: FedGenConfig | None, overrides: dict[str, Any]) -> FedGenConfig:
  """fedvp_jax's FedGen settings with ``overrides`` applied."""
  return dataclasses.replace(fedgen or FedGenConfig(), **overrides)


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
  **fedgen_overrides: Any,
) -> SeedStyleFederation:
  """A seed-style federation over fedvp_jax's ``ClientData`` (see the module doc)."""
  return SeedStyleFederation(
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
    resolve_fedgen(fedgen, fedgen_overrides),
    init_params,
    generator_params,
    latent_dim,
  )
