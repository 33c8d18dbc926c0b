"""Evaluation protocols: which viewers may be clients, where windows start, and which viewers
and traces test the global model on viewers who never trained ("new viewers").

* ``fedvp``: any viewer may be a client; windows start as early as M allows; the viewers left
  out of the clients are the new viewers, each tested on its test windows under the run's
  split.
* ``track``: the published evaluation of the head-motion-prediction community (TRACK, Romero
  Rondon et al.) on a dataset with split files: M = 5 samples (1 s) in, H = 25 (5 s) out,
  windows from t = 30 (6 s); the clients are the ``train_set`` viewers (training on the train
  videos, tested on the test videos), and the new viewers are exactly the ``test_set`` pairs,
  the published test set (its no-motion errors reproduce the published ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from fedvp_jax.data.datasets import DatasetSpec
from fedvp_jax.data.federated import EvalWindows, stack_windows
from fedvp_jax.data.traces import TraceSet
from fedvp_jax.data.windows import Windows, make_windows, viewer_windows
from fedvp_jax.errors import DataError, SettingError

TRACK_HISTORY, TRACK_HORIZON, TRACK_FIRST_WINDOW = 5, 25, 30


def first_window(protocol: str) -> int | None:
  """The earliest window time t under ``protocol`` (``None``: as early as M allows)."""
  return TRACK_FIRST_WINDOW if protocol == "track" else None


def client_candidates(protocol: str, traces: TraceSet, spec: DatasetSpec) -> tuple[str, ...]:
  """The viewers who may be clients under ``protocol``.

  Raises:
    SettingError: when ``track`` meets a window shape other than M = 5, H = 25.
    DataError: when ``track`` meets a dataset without split files.
  """
  if protocol != "track":
    return traces.users
  if (spec.history, spec.horizon) != (TRACK_HISTORY, TRACK_HORIZON):
    raise SettingError(
      "protocol",
      protocol,
      f"evaluates M={TRACK_HISTORY}, H={TRACK_HORIZON} windows; use dataset "
      f"{spec.name}-m{TRACK_HISTORY}-h{TRACK_HORIZON}, not {spec}",
    )
  if traces.split is None:
    raise DataError(
      f"dataset {traces.name}: the track protocol needs its split files train_set and test_set"
    )
  return tuple(u for u in traces.users if u in {u for u, _ in traces.split["train"]})


def new_viewer_candidates(
  protocol: str, traces: TraceSet, clients: Sequence[str]
) -> tuple[str, ...]:
  """The viewers who may test the global model under ``protocol``: every viewer who is not a
  client (``fedvp``), or the ``test_set`` viewers who are not (``track``). A candidate without
  test windows (:func:`new_viewer_test`) is left out of the new viewers."""
  if protocol == "track":
    assert traces.split is not None  # client_candidates checked it
    return tuple(dict.fromkeys(u for u, _ in traces.split["test"] if u not in set(clients)))
  return tuple(u for u in traces.users if u not in set(clients))


def new_viewer_test(
  protocol: str, traces: TraceSet, spec: DatasetSpec, user: str, split: str, seed: int
) -> Windows | None:
  """A candidate new viewer's test windows under ``protocol`` (``None``: it has none to be
  tested on, under ``fedvp``)."""
  if protocol == "track":
    assert traces.split is not None
    return Windows.concatenate(
      [
        make_windows(traces.traces[v, u], spec.history, spec.horizon, first=TRACK_FIRST_WINDOW)
        for u, v in traces.split["test"]
        if u == user
      ],
      spec.history,
      spec.horizon,
    )
  try:
    return viewer_windows(traces, user, spec.history, spec.horizon, split, seed)[2]
  except DataError:
    return None


def new_viewer_windows(
  protocol: str,
  traces: TraceSet,
  spec: DatasetSpec,
  clients: Sequence[str],
  split: str,
  seed: int,
) -> tuple[tuple[str, ...], EvalWindows | None]:
  """The new viewers under ``protocol`` and their test windows, one row per viewer (``None``
  when every viewer is a client)."""
  users, per_user = [], []
  for user in new_viewer_candidates(protocol, traces, clients):
    test = new_viewer_test(protocol, traces, spec, user, split, seed)
    if test is not None:
      users.append(user)
      per_user.append(test)
  if not users:
    return (), None
  return tuple(users), EvalWindows(*map(jnp.asarray, stack_windows(per_user)))


__all__ = [
  "client_candidates",
  "first_window",
  "new_viewer_candidates",
  "new_viewer_test",
  "new_viewer_windows",
]
