"""Orbax checkpoints of the train state plus JSON metadata (data position, config).

Thin wrapper over orbax-checkpoint's v0 ``CheckpointManager`` API: asynchronous saves, atomic commits
(``<step>.orbax-checkpoint-tmp`` renamed to ``<step>/`` only when complete, so a crash mid-write leaves the
previous checkpoint as the latest), ``max_to_keep`` retention, and restore into an abstract target so the
restored arrays get the target's shapes, dtypes and shardings.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Attributes: directory (absolute path of ``<workdir>/checkpoints``); max_to_keep; async saves."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves the state pytree and a JSON-serialisable dict (e.g. {"step", "data_step", "config"})."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, meta) of ``step``; abstract_state gives the tree structure, shapes and dtypes."""
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                          abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_raw(self, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state as nested dicts of arrays, meta) of ``step`` (default: latest) without a target structure."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                   meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
