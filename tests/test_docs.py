"""The API reference is in step with the code, and every public name is exported."""

import importlib
import importlib.util
import inspect
import pkgutil

from conftest import REPO

import fedvp_jax


def load_generator():
  """scripts/gen_api_docs.py as a module: it owns the list of public packages."""
  spec = importlib.util.spec_from_file_location(
    "gen_api_docs", REPO / "scripts" / "gen_api_docs.py"
  )
  generator = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generator)
  return generator


def test_api_reference_is_up_to_date():
  generator = load_generator()
  on_disk = (REPO / "docs" / "api.md").read_text()
  assert on_disk == generator.render(), "docs/api.md is stale: run python scripts/gen_api_docs.py"


def test_every_public_name_is_exported():
  exported = set()
  for package in load_generator().PACKAGES:
    module = importlib.import_module(package)
    for name in module.__all__:
      assert hasattr(module, name), f"{package}.__all__ names missing {name}"
    exported |= set(module.__all__)
  unexported = []
  for info in pkgutil.walk_packages(fedvp_jax.__path__, "fedvp_jax."):
    if info.name == "fedvp_jax.flower.apps" and importlib.util.find_spec("flwr") is None:
      continue  # imports flwr (the optional flower extra); it defines no function or class
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
      defined_here = getattr(obj, "__module__", None) == module.__name__
      is_code = inspect.isfunction(obj) or inspect.isclass(obj)
      if defined_here and is_code and not name.startswith("_") and name not in exported:
        unexported.append(f"{module.__name__}.{name}")
  assert not unexported, f"public but not exported (export it or make it _private): {unexported}"
