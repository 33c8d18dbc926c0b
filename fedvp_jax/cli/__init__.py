"""The ``fedvp`` command: ``fedvp train | sweep | report`` (also ``python -m fedvp_jax``).

Parsing and ``--help`` import neither JAX nor NumPy, so they answer at once.
"""

from __future__ import annotations

import sys

COMMANDS = {
  "train": "train a model (one configuration, its seeds together)",
  "sweep": "run a grid of configurations into one folder, with its table and plots",
  "report": "redraw the table and plots of finished runs",
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    usage = "\n".join(f"  {name:8s}{text}" for name, text in COMMANDS.items())
    print(
      f"usage: fedvp {{{','.join(COMMANDS)}}} ...\n\ncommands:\n{usage}\n\n"
      "fedvp COMMAND --help describes each."
    )
    known = not argv or argv[0] in ("-h", "--help")
    if not known:
      print(f"fedvp: unknown command {argv[0]!r}", file=sys.stderr)
    return 0 if known else 2
  import importlib

  module = importlib.import_module(f"fedvp_jax.cli.{argv[0]}")
  return module.main(argv[1:], prog=f"fedvp {argv[0]}")


__all__ = ["COMMANDS", "main"]
