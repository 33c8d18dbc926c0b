"""Command-line flags derived from the settings' schema (:data:`fedvp_jax.config.SCHEMA`),
shared by ``fedvp train`` and ``fedvp sweep``.

Every setting gets its flag spellings, each also with ``_`` for ``-`` and the other way round
(``--local-steps``, ``--local_steps``, ``--local_epochs``); ``--help`` shows the first. No flag
has a default of its own: a flag not given leaves the setting at the schema's default. A
setting given twice under two spellings (``--algo fedavg --algorithm fedgen``) is an error.
Values are checked once, when the config is built, and a bad one is reported against its flag.
This module imports neither JAX nor NumPy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fedvp_jax.config import SCHEMA, RunConfig, Setting, with_settings
from fedvp_jax.errors import SettingError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Shows one spelling per flag (the first), and the default from the schema."""

  def _format_action_invocation(self, action: argparse.Action) -> str:
    if not action.option_strings:
      return super()._format_action_invocation(action)
    flag = action.option_strings[0]
    if action.nargs == 0:
      return flag
    return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def spellings(s: Setting) -> list[str]:
  """Every accepted spelling of ``s``'s flag, the shown one first."""
  found: list[str] = []
  for flag in s.flags:
    body = flag[2:]
    for variant in (flag, "--" + body.replace("-", "_"), "--" + body.replace("_", "-")):
      if variant not in found:
        found.append(variant)
  return found


class _Once(argparse.Action):
  """Stores a setting's value; refuses a second spelling of the same setting."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = getattr(namespace, "_given", {})
    if self.dest in given and given[self.dest] != option_string:
      parser.error(f"{given[self.dest]} and {option_string} set the same setting; give one")
    given[self.dest] = option_string
    namespace._given = given
    value = True if self.const is True else False if self.const is False else values
    setattr(namespace, self.dest, value)


def add_settings(parser: argparse.ArgumentParser) -> None:
  """Adds a flag for every setting to ``parser`` (see the module docstring)."""
  groups = {
    "": parser.add_argument_group("run"),
    "round": parser.add_argument_group("round"),
    "fedgen": parser.add_argument_group(
      "FedGen", "used by fedgen, local-fedgen and partial-fedgen; accepted by every algorithm"
    ),
  }
  for s in SCHEMA.values():
    group = groups[".".join(s.path[:-1])]
    shown_default = "" if s.default is None else f" (default {_shown(s.default)})"
    if s.kind is bool:  # --embedding / --no-embedding, so both values can be given
      negated = ["--no-" + flag[2:] for flag in spellings(s)]
      for flags, value, text in (
        (spellings(s), True, s.help + shown_default),
        (negated, False, argparse.SUPPRESS),
      ):
        group.add_argument(
          *flags,
          dest=s.name,
          action=_Once,
          nargs=0,
          const=value,
          default=argparse.SUPPRESS,
          help=text,
        )
      continue
    group.add_argument(
      *spellings(s),
      dest=s.name,
      action=_Once,
      default=argparse.SUPPRESS,
      metavar=s.name.upper() if s.choices is None else "{" + ",".join(s.choices) + "}",
      help=s.help + shown_default,
    )


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The settings ``args`` gives, by name, as text (not yet coerced)."""
  return {name: value for name, value in vars(args).items() if name in SCHEMA}


def config_from(
  parser: argparse.ArgumentParser, settings: dict[str, Any], base: RunConfig | None = None
) -> RunConfig:
  """``base`` (the defaults) with ``settings`` applied; a bad value exits through
  ``parser.error`` naming its flag."""
  try:
    return with_settings(base or RunConfig(), settings, from_text=True)
  except SettingError as err:
    flag = SCHEMA[err.setting].flag if err.setting in SCHEMA else err.setting
    shown = "" if err.value is None else f"{err.value}: "
    parser.error(f"argument {flag}: {shown}{err.reason}")


def _shown(value: Any) -> str:
  return ",".join(value) if isinstance(value, tuple) else str(value)


def parse_known(argv: Sequence[str]) -> dict[str, Any]:
  """The settings ``argv`` gives (other words ignored), for overriding a spec's."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  add_settings(parser)
  args, _ = parser.parse_known_args(argv)
  return given_settings(args)


__all__ = [
  "HelpFormatter",
  "add_settings",
  "config_from",
  "given_settings",
  "parse_known",
  "spellings",
]
