"""Sphinx extension: every public name of ``linformer_jax`` has a docstring and a place in the API reference.

A public module is one whose dotted path has no component starting with ``_`` (``__main__`` CLIs excluded). Its
public names are its ``__all__`` when it defines one, otherwise the functions and classes it defines and the names it
assigns at top level, none starting with ``_``; for each public class also the methods and properties it defines
(``__call__`` included, flax's ``setup`` hook excluded). A name is documented when it has its own docstring (a
constant: a ``#:`` comment or a string right after the assignment, as autodoc reads them) and the built reference
holds a Python object of its dotted path. Each failure is a Sphinx warning, so ``sphinx -W`` fails the build; the
count is logged as ``api coverage: N public names, M undocumented``.

Used as ``extensions = [..., "api_coverage"]`` with ``api_coverage_package = "linformer_jax"``; ``python
docs/_ext/api_coverage.py`` prints the names that lack a docstring without building.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import sys
from typing import Iterator

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
SKIPPED_METHODS = ("setup",)  # flax's lifecycle hook: called by flax, not by users


@dataclasses.dataclass(frozen=True)
class PublicName:
  """One public name: ``path`` is its dotted path in the reference, ``problem`` what is missing ("" if nothing)."""
  path: str
  problem: str


def public_modules(package: str) -> list[str]:
  """Dotted names of the public modules of ``package`` (itself included), sorted."""
  root = importlib.import_module(package)
  names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
  return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")[1:]))


def _assigned_names(module) -> list[str]:
  """Names assigned at the top level of ``module``'s source (``X = ...``, ``X: T = ...``)."""
  tree = ast.parse(inspect.getsource(module))
  names = []
  for node in tree.body:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names += [t.id for t in targets if isinstance(t, ast.Name)]
  return names


def _own_doc(obj) -> str:
  """The docstring ``obj`` itself defines: not inherited, not the ``Name(field, ...)`` text dataclasses invent."""
  doc = obj.__doc__  # not inspect.getdoc: it falls back to a base class's docstring
  if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}(") and dataclasses.is_dataclass(obj):
    return ""
  return (doc or "").strip()


def _attribute_docs(module_name: str) -> dict:
  """``{(namespace, name): lines}`` of the ``#:`` and string docs of the assignments in a module's source."""
  try:
    return ModuleAnalyzer.for_module(module_name).find_attr_docs()
  except Exception:  # pylint: disable=broad-except  (a module without source: no attribute docs)
    return {}


def _defining_module(module, name: str, value) -> str:
  """The module whose source defines ``name`` (re-exports of constants: the submodule that assigns it)."""
  if name in _assigned_names(module):
    return module.__name__
  if inspect.isclass(value) or inspect.isroutine(value):
    return getattr(value, "__module__", module.__name__)
  for sub in public_modules(module.__name__) if hasattr(module, "__path__") else []:
    if sub != module.__name__ and name in _assigned_names(importlib.import_module(sub)):
      return sub
  return module.__name__


def _class_members(cls) -> Iterator[tuple[str, object]]:
  """The public methods and properties a class defines itself (``__call__`` included)."""
  for name, value in vars(cls).items():
    if (name.startswith("_") and name != "__call__") or name in SKIPPED_METHODS:
      continue
    if isinstance(value, (staticmethod, classmethod)):
      value = value.__func__
    if inspect.isfunction(value) or isinstance(value, property):
      yield name, value


def audit(package: str) -> list[PublicName]:
  """Every public name of ``package`` with what it lacks in its source (the reference is checked separately).

  Args:
    package: the top-level package, e.g. ``"linformer_jax"``.

  Returns:
    One ``PublicName`` per public module, name and class member; ``problem`` is ``"no docstring"`` or ``""``.
  """
  found = []
  for module_name in public_modules(package):
    module = importlib.import_module(module_name)
    found.append(PublicName(module_name, "" if (module.__doc__ or "").strip() else "no docstring"))
    if hasattr(module, "__all__"):
      names = list(module.__all__)
    else:
      defined = [n for n, v in vars(module).items()
                 if (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module_name]
      names = defined + [n for n in _assigned_names(module) if n not in defined]
    for name in (n for n in dict.fromkeys(names) if not n.startswith("_")):
      value = getattr(module, name)
      path = f"{module_name}.{name}"
      assigned = name in _assigned_names(module)  # ``dense_init = nn.initializers...``: documented as a constant
      if (inspect.isclass(value) or inspect.isroutine(value)) and not assigned:
        found.append(PublicName(path, "" if _own_doc(value) else "no docstring"))
        if inspect.isclass(value):
          found += [PublicName(f"{path}.{m}", "" if _own_doc(v.fget if isinstance(v, property) else v)
                               else "no docstring") for m, v in _class_members(value)]
      else:
        home = _defining_module(module, name, value)
        documented = ("", name) in _attribute_docs(home)
        found.append(PublicName(path, "" if documented else "no docstring (a constant: add a #: comment)"))
  return found


def _check_reference(app, env) -> None:
  """``env-check-consistency``: warn for each public name without a docstring or without an object in the pages."""
  package = app.config.api_coverage_package
  objects = set(env.get_domain("py").objects) | set(env.get_domain("py").modules)
  names = audit(package)
  missing = 0
  for item in names:
    problem = item.problem or ("" if item.path in objects else "no entry in the API reference")
    if problem:
      missing += 1
      LOGGER.warning("api coverage: %s: %s", item.path, problem, type="api_coverage")
  LOGGER.info("api coverage: %d public names, %d undocumented", len(names), missing)


def setup(app):
  """Registers the check (run once the pages are read) and the ``api_coverage_package`` option."""
  app.add_config_value("api_coverage_package", "", "env")
  app.connect("env-check-consistency", _check_reference)
  return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
  undocumented = [n for n in audit(sys.argv[1] if len(sys.argv) > 1 else "linformer_jax") if n.problem]
  print("\n".join(f"{n.path}: {n.problem}" for n in undocumented))
  print(f"{len(undocumented)} undocumented")
