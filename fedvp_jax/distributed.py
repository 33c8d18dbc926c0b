"""One run over several processes and hosts, on JAX's own multi-controller runtime.

Every process runs the same command. :func:`start` joins the job through
``jax.distributed.initialize``, from explicit flags (``--coordinator HOST:PORT
--num-processes P --process-id I``) or from a cluster environment that JAX detects (SLURM,
Open MPI, Kubernetes); otherwise the run is one process, exactly as without this module. Once
joined, ``jax.devices()`` lists every process's devices, the clients mesh spans them all
(:mod:`fedvp_jax.sharding`), each process reads only the traces of the clients its devices hold
(:func:`fedvp_jax.experiment.prepare`), and only process 0 writes the run directory
(:func:`fedvp_jax.rundir.is_process_zero`); checkpoints are written by all of them through orbax.

What can go wrong is said in one line: a coordinator that cannot be reached
(:data:`CONNECT_SECONDS`), processes whose configurations differ (:func:`check_same`, before
any round) and a process that died (:class:`peers_checked`, within :data:`HEARTBEAT_SECONDS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Literal

import jax
import numpy as np

from fedvp_jax.errors import ConfigError, JobError

CONNECT_SECONDS = 60
"""How long a process waits for the coordinator (and the other processes) at start-up."""

HEARTBEAT_SECONDS = 10
"""A process silent for this long is declared dead, and the job stops."""


def start(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout: int = CONNECT_SECONDS,
) -> None:
  """Joins a multi-process job, or does nothing for a run of one process.

  With ``coordinator`` (``HOST:PORT`` of process 0, which serves it) the job is the one the
  arguments describe; without it, a cluster environment that JAX detects (SLURM's ``srun``,
  Open MPI's ``mpirun``, a Kubernetes indexed job) describes it; with neither, nothing
  happens. A process whose peer dies is not aborted by JAX's runtime: a watchdog thread
  finds the dead processes within :data:`HEARTBEAT_SECONDS`, the computation that met the
  failure raises :class:`~fedvp_jax.errors.JobError` naming them (:class:`peers_checked`), and
  a process stuck waiting for the dead one prints that line and exits with code 2. Call
  :func:`finish` when the job's work is done, before a process leaves.

  Raises:
    ConfigError: for flags that do not describe a job, or a coordinator that cannot be reached
      within ``timeout`` seconds.
  """
  explicit = (coordinator, num_processes, process_id)
  if all(value is None for value in explicit):
    if not _cluster_detected():
      return
  elif any(value is None for value in explicit):
    raise ConfigError(
      "--coordinator, --num-processes and --process-id go together (or none of them, under "
      "SLURM, Open MPI or Kubernetes, which JAX reads them from)"
    )
  elif not 0 <= process_id < num_processes:  # type: ignore[operator]
    raise ConfigError(
      f"--process-id {process_id}: must be 0 to {num_processes - 1} for --num-processes "  # type: ignore[operator]
      f"{num_processes}"
    )
  if coordinator is not None and process_id != 0 and not _reachable(coordinator, timeout):
    # JAX's own client would abort the process with a stack dump instead.
    raise ConfigError(
      f"--coordinator {coordinator}: process {process_id} could not join the job of "
      f"{num_processes} processes within {timeout} s (nothing answers there; start process 0 "
      "first, and check the address and that the port is open)"
    )
  # The survivors of a dead process must report it and stop, not be aborted by the runtime.
  jax.config.update("jax_enable_recoverability", True)
  try:
    jax.distributed.initialize(
      coordinator,
      num_processes,
      process_id,
      initialization_timeout=timeout,
      heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
    )
  except Exception as err:  # JAX raises several kinds (RuntimeError, JaxRuntimeError, ValueError)
    where = coordinator or "the coordinator the cluster environment names"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ConfigError(
      f"--coordinator {where}: process {process_id} could not join the job of "
      f"{num_processes} processes within {timeout} s ({first[:200]})"
    ) from None
  threading.Thread(target=_watch, name="fedvp-watchdog", daemon=True).start()


def _reachable(address: str, timeout: float) -> bool:
  """Whether something accepts connections at ``HOST:PORT`` within ``timeout`` seconds."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
        return True
    except (OSError, ValueError):
      if time.monotonic() > deadline:
        return False
      time.sleep(0.2)


def _cluster_detected() -> bool:
  """Whether a cluster environment that ``jax.distributed.initialize()`` reads is present."""
  from jax._src import clusters  # the detection jax.distributed.initialize() runs itself

  return any(
    cluster.is_env_present()
    for cluster in clusters.ClusterEnv._cluster_types
    if cluster.opt_in_only_method is False
  )


def is_multiprocess() -> bool:
  """Whether this process is one of several."""
  return jax.process_count() > 1


def fetch(tree: Any) -> Any:
  """A host (NumPy) copy of ``tree``, whose arrays may be split over every process's devices:
  each process gets the whole of every array."""
  if not is_multiprocess():
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def maximum(values: Any) -> np.ndarray:
  """The elementwise maximum of ``values`` (an integer array) over every process."""
  values = np.asarray(values, np.int64)
  if not is_multiprocess():
    return values
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def check_same(text: str, what: str) -> None:
  """Checks that every process holds the same ``text`` (e.g. the resolved configuration).

  Raises:
    JobError: naming the processes whose ``text`` differs from process 0's.
  """
  if not is_multiprocess():
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=8).digest(), np.int32)
  every = np.asarray(multihost_utils.process_allgather(digest))
  differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differ:
    raise JobError(
      f"process(es) {', '.join(map(str, differ))} of {len(every)} run a different {what} than "
      "process 0; every process must run the same command with the same files"
    )


def agree(text: str) -> str:
  """Process 0's ``text`` (at most 1024 bytes of UTF-8), on every process: e.g. a run name that
  carries the time it started."""
  if not is_multiprocess():
    return text
  from jax.experimental import multihost_utils

  raw = np.zeros(1024, np.uint8)
  encoded = np.frombuffer(text.encode()[:1024], np.uint8)
  raw[: len(encoded)] = encoded
  shared = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(shared).rstrip(b"\0").decode()


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (e.g. process 0 made the run directory)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class peers_checked:  # noqa: N801 (used as a statement: `with peers_checked():`)
  """A block of a multi-process run in which an error caused by another process dying
  becomes the :class:`~fedvp_jax.errors.JobError` of :func:`peer_failure`; other errors pass
  through unchanged."""

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind: Any, err: BaseException | None, traceback: Any) -> Literal[False]:
    failure = peer_failure(err)
    if failure is not None:
      raise failure from None
    return False


_LOST_PEER = re.compile(r"Gloo|[Cc]onnection (closed|reset|refused)|UNAVAILABLE|heartbeat")
"""What the runtime's errors say when a collective lost a process (gloo on CPU, the
coordination service on every platform)."""


def peer_failure(err: BaseException | None) -> JobError | None:
  """What ``err`` means when it was raised in a job of several processes because another
  process died: the watchdog's :class:`~fedvp_jax.errors.JobError` naming the processes that
  stopped answering (awaited up to twice :data:`HEARTBEAT_SECONDS`); ``None`` otherwise."""
  if not is_multiprocess() or not isinstance(err, Exception):
    return None
  if not isinstance(err, jax.errors.JaxRuntimeError) or not _LOST_PEER.search(str(err)):
    return None
  _watchdog.found.wait(timeout=2 * HEARTBEAT_SECONDS)
  return _watchdog.verdict


@dataclasses.dataclass
class _Watchdog:
  found: threading.Event = dataclasses.field(default_factory=threading.Event)
  stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
  verdict: JobError | None = None


_watchdog = _Watchdog()

WATCHDOG_GRACE_SECONDS = 5
"""How long the watchdog lets the main thread report a dead process before it does."""


def _watch() -> None:
  """Every second, asks the coordinator which processes are alive (a call every live process
  makes, so it returns once the dead are declared dead); on a death, records the verdict for
  :func:`peer_failure` and, if the main thread has not exited by then, prints it and exits."""
  from jax._src import distributed as state

  client = state.global_state.client
  everyone = list(range(jax.process_count()))
  while not _watchdog.stopping.is_set():
    try:
      alive = set(client.get_live_nodes(everyone)) if client is not None else set(everyone)
    except Exception:  # the coordinator itself is gone: process 0 died
      alive = set(everyone) - {0}
    dead = [p for p in everyone if p not in alive]
    if dead and not _watchdog.stopping.is_set():
      who = ", ".join(map(str, dead))
      _watchdog.verdict = JobError(
        f"process {who} of {len(everyone)} stopped (it failed, was killed or was unreachable "
        f"for {HEARTBEAT_SECONDS} s), so process {jax.process_index()} stops too; resume the "
        "run with --resume, on as many processes as are at hand"
      )
      _watchdog.found.set()
      time.sleep(WATCHDOG_GRACE_SECONDS)
      print(f"error: {_watchdog.verdict}", file=sys.stderr, flush=True)
      os._exit(2)
    time.sleep(1.0)


def finish() -> None:
  """Ends this process's part of the job: once every process has reached it, none of them
  leaving is a failure (it stops the watchdog), and the processes leave the job in order:
  process 0, which serves it, last."""
  if not is_multiprocess():
    return
  from jax._src import distributed as state

  _watchdog.stopping.set()
  barrier("finish")
  client, me = state.global_state.client, jax.process_index()
  if client is None:
    return
  if me != 0:
    # Gone before process 0 stops serving: a client that disconnects from a stopped
    # coordinator is aborted by the runtime.
    client.key_value_set(f"fedvp/left/{me}", "1")
    jax.distributed.shutdown()
    return
  for other in range(1, jax.process_count()):
    client.blocking_key_value_get(f"fedvp/left/{other}", 1000 * CONNECT_SECONDS)
  time.sleep(1.0)  # their disconnect is under way once the key is set
  jax.distributed.shutdown()


__all__ = [
  "CONNECT_SECONDS",
  "HEARTBEAT_SECONDS",
  "agree",
  "barrier",
  "check_same",
  "fetch",
  "finish",
  "is_multiprocess",
  "maximum",
  "peer_failure",
  "peers_checked",
  "start",
]
