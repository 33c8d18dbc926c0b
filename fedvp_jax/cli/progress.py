"""The progress bar of the command line: rich's, fed by the runner's
:class:`~fedvp_jax.runner.Progress` events. Says "compiling" while the first round compiles,
then shows rounds done, elapsed time, ETA and the last loss. Off a terminal, rich prints the
bar once at the end instead of redrawing it."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from rich.console import Console
from rich.progress import (
  BarColumn,
  MofNCompleteColumn,
  Progress,
  TextColumn,
  TimeElapsedColumn,
  TimeRemainingColumn,
)


def follow(steps: Generator[Any, None, Any], enabled: bool = True) -> Any:
  """Runs ``steps`` (yielding ``Progress``, or ``(name, Progress)`` for a sweep) to the end,
  drawing a bar per run on stderr; returns what ``steps`` returns."""
  columns = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TextColumn("ETA"),
    TimeRemainingColumn(),
    TextColumn("{task.fields[status]}"),
  )
  tasks: dict[str, Any] = {}
  with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
    while True:
      try:
        event = next(steps)
      except StopIteration as stop:
        return stop.value
      name, p = event if isinstance(event, tuple) else ("", event)
      key = f"{name} {p.label}".strip()
      if key not in tasks:
        tasks[key] = bar.add_task(key, total=p.total, completed=p.done, status="")
      if p.compiling:
        bar.update(tasks[key], completed=p.done, status="compiling the round...")
        continue
      loss = p.test_loss if p.test_loss is not None else p.train_loss
      kind = "test" if p.test_loss is not None else "train"
      status = "" if loss is None else f"{kind} loss {loss:.5f}"
      bar.update(tasks[key], completed=p.done, status=status)


__all__ = ["follow"]
