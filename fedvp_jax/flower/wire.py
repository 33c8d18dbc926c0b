"""Params on the wire: a pytree as named arrays (its tree paths, ``"head/linear/kernel"``),
and back, checking that both ends agree on the tree's structure and shapes.

Only :func:`to_record` and :func:`from_record` touch Flower (its ``ArrayRecord``), and they
import it when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fedvp_jax.errors import FedVPError


class WireError(FedVPError):
  """Arrays received do not fit the receiver's tree: another model or configuration."""


def _name(path: tuple[Any, ...]) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def named_arrays(tree: Any) -> dict[str, np.ndarray]:
  """``tree``'s leaves as NumPy arrays by their tree path, in the tree's leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(path): np.asarray(leaf) for path, leaf in leaves}


def from_named(named: Mapping[str, np.ndarray], like: Any, what: str = "params") -> Any:
  """The tree shaped like ``like`` (arrays or ``jax.ShapeDtypeStruct``) whose leaves are
  ``named``'s arrays of the same paths.

  Raises:
    WireError: one line naming what differs (missing or unexpected names, a shape or dtype)
      when ``named`` is not ``like``'s structure.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  expected = {_name(path): leaf for path, leaf in flat}
  missing = [n for n in expected if n not in named]
  extra = [n for n in named if n not in expected]
  problems = []
  if missing:
    problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
  if extra:
    problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
  for n, leaf in expected.items():
    if n in named:
      got = named[n]
      if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
        problems.append(
          f"{n} is {np.dtype(got.dtype).name}{list(got.shape)}, expected "
          f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
        )
  if problems:
    raise WireError(
      f"the {what} received do not match this end's model ({len(expected)} arrays): "
      + "; ".join(problems[:4])
      + " (are both ends running the same model and settings?)"
    )
  return jax.tree_util.tree_unflatten(treedef, [named[n] for n in expected])


def to_record(tree: Any) -> Any:
  """``tree`` as a Flower ``ArrayRecord`` of :func:`named_arrays`."""
  from flwr.app import Array, ArrayRecord

  return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in named_arrays(tree).items()})


def from_record(record: Any, like: Any, what: str = "params") -> Any:
  """The tree a Flower ``ArrayRecord`` holds, checked against ``like`` (see
  :func:`from_named`)."""
  named = {n: a.numpy() for n, a in record.items()}
  # Flower's Array carries a 0-d array as shape [1]: give scalars (adam's step count) back
  # their shape.
  for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
    n = _name(path)
    if n in named and tuple(leaf.shape) == () and named[n].shape == (1,):
      named[n] = named[n].reshape(())
  return from_named(named, like, what)


__all__ = ["WireError", "from_named", "from_record", "named_arrays", "to_record"]
