"""``Sweep``: an ablation sweep over a config, defined beside that config and run by ``experiments.ablate``.

A config module that has sweeps returns them from ``get_sweeps()`` (``configs/mlm_linformer.py``,
``configs/listops.py``, ``configs/digits_xcit.py``); ``python -m experiments.ablate --sweep NAME`` finds them there.
Overrides are dotted config fields ("model.k"); "warmup" is short for "optimizer.warmup_steps".
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
from typing import Optional

ALIASES = {"warmup": "optimizer.warmup_steps"}


def set_dotted(config, key: str, value) -> None:
  """Sets the dotted field ``key`` (or its alias); ValueError for an unknown field outside ``model``."""
  key = ALIASES.get(key, key)
  target = config
  *parents, leaf = key.split(".")
  for p in parents:
    target = target[p]
  if leaf not in target and parents != ["model"]:  # model fields are module kwargs: new ones may be added
    raise ValueError(f"unknown config field {key!r}.")
  target[leaf] = value


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One training run per arm × seed of a base config.

  Attributes:
    name: the sweep's name (``--sweep``).
    config: "module:arg" of the base config, ``configs/<module>.py:get_config(arg)``.
    base: sweep-wide overrides of the full sweep.
    arms: ((arm name, overrides), ...), applied after ``base``.
    seeds: the full seed set (``seed``: model initialisation and dropout; the data do not change).
    metric: the headline eval metric.
    claim: the paper's claim.
    shrunk: what the full sweep shrank relative to the paper.
    quick: ``--quick`` runs the same arms on ``<module>:runlocal`` with the first seed and runlocal's number of
      steps (an arm's total_steps is not applied); these overrides take the place of ``base`` there (only what the
      arms need on the tiny config).
    test_split: also evaluate the final checkpoint on the "test" split.
    reference: the arm whose mean headline metric the others are divided by (the "÷ reference" column).
    common_eval: also score every run on the same bytes (MLM sweeps over data.max_len; the ÷ column then uses
      that score).
  """
  name: str
  config: str
  base: dict
  arms: tuple
  seeds: tuple
  metric: str
  claim: str
  shrunk: str
  quick: dict = dataclasses.field(default_factory=dict)
  test_split: bool = False
  reference: Optional[str] = None
  common_eval: bool = False

  @property
  def ratio_metric(self) -> str:
    """The metric of the "÷ reference" column."""
    return "common_eval_perplexity" if self.common_eval else self.metric

  def base_for(self, quick: bool) -> dict:
    """The sweep-wide overrides: ``base``, or ``quick`` (on the runlocal config)."""
    return self.quick if quick else self.base

  def seeds_for(self, quick: bool) -> tuple:
    return self.seeds[:1] if quick else self.seeds

  @staticmethod
  def arm_overrides(overrides: dict, quick: bool) -> dict:
    """An arm's overrides as applied: with ``quick`` the run length is runlocal's (no total_steps)."""
    return {k: v for k, v in overrides.items() if not (quick and k == "total_steps")}

  def run_config(self, overrides: dict, seed: int, quick: bool, extra: Optional[dict] = None):
    """The config of one run: the base config (runlocal if ``quick``), then the sweep-wide, the arm's and the
    ``extra`` overrides, and ``seed``."""
    module, _, arg = self.config.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config("runlocal" if quick else (arg or None))
    for key, value in [*self.base_for(quick).items(), *{**self.arm_overrides(overrides, quick),
                                                       **(extra or {})}.items()]:
      set_dotted(config, key, value)
    config.seed = seed
    return config

  def run_key(self, overrides: dict, seed: int, quick: bool, extra: Optional[dict] = None) -> str:
    """Identity of a run: its base config, the sweep's and the arm's overrides, extra overrides and seed (not the
    whole resolved config, so that a new default field elsewhere does not invalidate finished runs)."""
    drop = lambda d: {k: v for k, v in (d or {}).items() if k != "total_steps"}  # noqa: E731 (runs can be extended)
    spec = {"config": self.config, "quick": quick, "base": drop(self.base_for(quick)), "arm": drop(overrides),
            "extra": drop(extra), "seed": seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:16]

  def select_arms(self, names=None) -> tuple:
    """The arms named in ``names`` (all if None), in the sweep's order; ValueError for an unknown name."""
    unknown = sorted(set(names or ()) - {a for a, _ in self.arms})
    if unknown:
      raise ValueError(f"unknown arm(s) {unknown} of sweep {self.name!r}; allowed: {[a for a, _ in self.arms]}.")
    return tuple((a, o) for a, o in self.arms if not names or a in names)

  def longest_max_len(self, quick: bool, extra: Optional[dict] = None) -> int:
    """The longest data.max_len over all arms (not only those selected with --arms): the common-eval length."""
    return max(self.run_config(o, 0, quick, extra).data.max_len for _, o in self.arms)


def find_sweeps() -> dict:
  """{name: Sweep} of every ``get_sweeps()`` in the ``configs`` package (modules in name order)."""
  import configs
  sweeps = {}
  for module in pkgutil.iter_modules(configs.__path__):
    for sweep in getattr(importlib.import_module(f"configs.{module.name}"), "get_sweeps", list)():
      if sweep.name in sweeps:
        raise ValueError(f"sweep {sweep.name!r} is defined twice (configs/{module.name}.py).")
      sweeps[sweep.name] = sweep
  return sweeps
