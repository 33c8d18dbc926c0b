"""What the peer-framework benchmarks (``peer_pfl.py``, ``peer_flower.py``) share: fedvp_jax's
clients as numpy arrays, the PyTorch model they start from, and the Average Global Loss."""

from __future__ import annotations

from typing import Any

import numpy as np


def client_arrays(client_data: Any) -> list[dict[str, np.ndarray]]:
  """Every client's real (unpadded) train and test windows as float32 numpy arrays."""
  arrays = {
    name: np.asarray(getattr(client_data, name))
    for name in ("train_x", "train_y", "train_mask", "test_x", "test_y", "test_mask")
  }
  clients = []
  for i in range(arrays["train_x"].shape[0]):
    train, test = arrays["train_mask"][i], arrays["test_mask"][i]
    clients.append(
      {
        "train_x": arrays["train_x"][i][train].astype(np.float32),
        "train_y": arrays["train_y"][i][train].astype(np.float32),
        "test_x": arrays["test_x"][i][test].astype(np.float32),
        "test_y": arrays["test_y"][i][test].astype(np.float32),
      }
    )
  return clients


def initial_torch_model(name: str, history: int, horizon: int, seed: int) -> Any:
  """``torch_models``' PyTorch twin of fedvp_jax's ``name`` model (PyTorch's fused kernels),
  holding the very parameters fedvp_jax's run with ``seed`` starts from (``init`` gets the
  first half of ``split(key(seed))``, as in :func:`fedvp_jax.rounds.iterate_rounds`)."""
  import jax
  import torch_models

  from fedvp_jax.models import build_model

  init_key = jax.random.split(jax.random.key(seed))[0]
  params = jax.tree.map(np.array, build_model(name, history, horizon).init(init_key))
  return torch_models.load_from_jax(torch_models.build_torch_model(name, history, horizon), params)


def test_mse(net: Any, clients: list[dict[str, np.ndarray]]) -> float:
  """The Average Global Loss: MSE over every client's test windows, each window once."""
  import torch

  net.eval()
  with torch.no_grad():
    squared, count = 0.0, 0
    for c in clients:
      prediction = net(torch.from_numpy(c["test_x"]))
      squared += float(torch.sum(torch.square(prediction - torch.from_numpy(c["test_y"]))))
      count += c["test_y"].size
  net.train()
  return squared / count
