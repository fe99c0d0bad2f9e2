"""Orbax checkpoints of the train state plus JSON metadata (data position, config).

Thin wrapper over orbax-checkpoint's v0 ``CheckpointManager`` API: asynchronous saves, atomic commits
(``<step>.orbax-checkpoint-tmp`` renamed to ``<step>/`` only when complete, so a crash mid-write leaves the
previous checkpoint as the latest), ``max_to_keep`` retention, and restore into an abstract target so the
restored arrays get the target's shapes, dtypes and shardings.

Robust resume (``restore_latest``): a checkpoint that cannot be read (truncated or missing files) is skipped with
a warning and moved to ``<directory>.corrupt/<step>-<time>``, and the previous one is used; if none can be read,
``CheckpointCorruptError``. A checkpoint whose arrays do not match the target (another model config) raises
``CheckpointMismatchError`` naming the differing arrays — it is not skipped, since every checkpoint of that
directory was written by the other config.

``CheckpointReader`` reads one step's model variables without the optimizer state and without touching the
directory (``linformer_jax.runs.load_model``).

``restore_variables`` + ``take_matching`` start a run from another checkpoint's weights (the trainer's
``init_from``): every variable whose path and shape match is taken.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_logger = logging.getLogger(__name__)

_MAX_LISTED = 8


class CheckpointCorruptError(ValueError):
  """Every checkpoint in the directory is unreadable (resume), or the one step read (``CheckpointReader``)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the state it is restored into (written by another model config)."""


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def array_names(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{dotted path (Orbax's naming, e.g. "params.encoder.layer_0.attention.query.kernel"): (shape, dtype)} of the
  array leaves of a pytree of arrays / ShapeDtypeStructs."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape"):
      out[".".join(_key_name(k) for k in path)] = (tuple(int(d) for d in leaf.shape), str(leaf.dtype))
  return out


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f" … and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"{title} ({len(items)}): " + ", ".join(shown) + more


def describe_mismatch(saved: dict, wanted: dict) -> str:
  """'' when the two {name: (shape, dtype)} maps agree on names and shapes; else a one-line report."""
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  shapes = [f"{n}: checkpoint {saved[n][0]}, config {wanted[n][0]}" for n in sorted(set(saved) & set(wanted))
            if saved[n][0] != wanted[n][0]]
  # Parameters first: they tell the user which model field differs; optimizer slots repeat the same story.
  by_params = lambda items: sorted(items, key=lambda s: (not s.startswith("params."), s))  # noqa: E731
  parts = [_listing(title, by_params(items)) for title, items in
           (("wrong shapes", shapes), ("missing from the checkpoint", missing),
            ("not in the config's state", unexpected)) if items]
  return "; ".join(parts)


class Checkpointer:
  """Saves, lists and restores train-state checkpoints of one directory (see the module docstring).

  Args:
    directory: the checkpoints directory (``<workdir>/checkpoints``); created if missing.
    max_to_keep: how many of the newest checkpoints are kept; older ones are deleted after a save.
    asynchronous: write checkpoints in the background (``wait`` / ``close`` block until they are committed).

  Attributes:
    directory: the absolute path of the checkpoints directory.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The committed steps (an unfinished ``<step>.orbax-checkpoint-tmp*`` write is not one)."""
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves the state pytree and a JSON-serialisable dict (e.g. {"step", "data_step", "config"})."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def saved_arrays(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of the state arrays stored at ``step``, read from the checkpoint's metadata only."""
    metadata = self._manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise ValueError(f"checkpoint {step} has no readable state metadata.")
    out = {}
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name")):
      if hasattr(leaf, "shape") and hasattr(leaf, "name"):
        out[str(leaf.name)] = (tuple(int(d) for d in leaf.shape), str(leaf.dtype))
    return out

  def check_compatible(self, abstract_state: Any, hint: Callable[[dict], str] | str = "") -> Optional[int]:
    """Raises CheckpointMismatchError unless the newest checkpoint whose metadata is readable stores arrays with
    the names and shapes of ``abstract_state``; returns its step (None if there is none). Reads metadata only:
    no array is restored and nothing is compiled, so a wrong config fails at start-up."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.saved_arrays(step)
      except Exception:  # pylint: disable=broad-except  (unreadable: restore_latest warns and skips it)
        continue
      self._raise_if_mismatched(step, saved, abstract_state, hint)
      return step
    return None

  def _raise_if_mismatched(self, step: int, saved: dict, abstract_state: Any, hint) -> None:
    report = describe_mismatch(saved, array_names(abstract_state))
    if not report:
      return
    if callable(hint):
      try:
        hint = hint(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      except Exception:  # pylint: disable=broad-except
        hint = ""
    raise CheckpointMismatchError(
        f"checkpoint {step} in {self.directory} was written for a different model or optimizer config: "
        f"{report}.{(' ' + hint) if hint else ''} Use a new --workdir, or go back to the config it was trained "
        "with.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, meta) of ``step``; abstract_state gives the tree structure, shapes and dtypes."""
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                          abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state: Any, hint: Callable[[dict], str] | str = ""
                     ) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest readable checkpoint, or None when the directory holds none.

    Unreadable checkpoints (truncated or missing files, unreadable metadata) are skipped with a warning that
    names the step directory and the error, and moved aside to ``<directory>.corrupt/`` (so the step can be
    written again). Raises CheckpointMismatchError for a checkpoint of another config (``hint``: extra text for
    the message, or a function of the checkpoint's meta returning it) and CheckpointCorruptError when
    checkpoints exist but none is readable.
    """
    bad = []
    result = None
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.saved_arrays(step)
      except Exception as err:  # pylint: disable=broad-except  (Orbax/TensorStore raise many types)
        bad.append(self._skip(step, err))
        continue
      self._raise_if_mismatched(step, saved, abstract_state, hint)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as err:  # pylint: disable=broad-except
        bad.append(self._skip(step, err))
        continue
      result = (step, state, meta)
      break
    if bad:
      self._quarantine([step for step, _ in bad])
    if result is None and bad:
      details = "; ".join(f"step {step}: {msg}" for step, msg in bad)
      raise CheckpointCorruptError(
          f"no readable checkpoint in {self.directory}: every checkpoint failed to restore ({details}). They were "
          f"moved to {self.directory}.corrupt/; delete the workdir's checkpoints (or use a new --workdir) to start "
          "from scratch.")
    return result

  def _skip(self, step: int, err: Exception) -> tuple[int, str]:
    msg = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    warnings.warn(f"skipping unreadable checkpoint {os.path.join(self.directory, str(step))} ({msg}); "
                  "falling back to the previous one.", RuntimeWarning, stacklevel=3)
    return step, msg

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable step directories out of the manager's directory (process 0 only)."""
    if jax.process_index() == 0:
      dest_root = self.directory + ".corrupt"
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          shutil.move(src, os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
          _logger.warning("moved unreadable checkpoint %s to %s", src, dest_root)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("linformer_jax.checkpoint.quarantine")
    self._manager.reload()

  def restore_raw(self, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state as nested dicts of arrays, meta) of ``step`` (default: latest) without a target structure."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                   meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager; the object is unusable afterwards."""
    self._manager.wait_until_finished()
    self._manager.close()


def _variable_name(name: str) -> str:
  """A train-state array name as a variable path: "model_state.constants.x" → "constants.x"."""
  return name.removeprefix("model_state.")


def first_mismatch(saved: dict, wanted: dict) -> str:
  """'' when two {name: (shape, dtype)} maps agree on names and shapes; else the first difference (a differing
  shape first, then a name missing from ``saved``, then one only in ``saved``; parameters before other arrays)."""
  order = lambda names: sorted(names, key=lambda s: (not s.startswith("params."), s))  # noqa: E731
  for name in order(set(saved) & set(wanted)):
    if saved[name][0] != wanted[name][0]:
      return f"{_variable_name(name)}: checkpoint shape {saved[name][0]}, model shape {wanted[name][0]}"
  for name in order(set(wanted) - set(saved)):
    return f"{_variable_name(name)}: not in the checkpoint (model shape {wanted[name][0]})"
  for name in order(set(saved) - set(wanted)):
    return f"{_variable_name(name)}: in the checkpoint (shape {saved[name][0]}) but not in the model"
  return ""


class CheckpointReader:
  """Read-only access to a ``Checkpointer`` directory, for inference: its committed steps and the model variables
  of one step (``params`` and the other collections, without the optimizer state).

  Nothing in the directory is created, cleaned up or moved (unlike ``Checkpointer``, which deletes unfinished
  ``*.orbax-checkpoint-tmp*`` steps and quarantines unreadable ones), so reading a run that is still training
  does not disturb it. Use as a context manager or call ``close()``.

  Attributes:
    directory: the absolute path of the checkpoints directory.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                           save_interval_steps=0, max_to_keep=None,
                                           enable_async_checkpointing=False)
    # The PyTree handler reads what StandardSave wrote and, unlike the Standard one, restores a subtree.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns "Given directory is read only" for every read-only manager
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    finally:
      absl_logger.setLevel(level)

  def __enter__(self) -> "CheckpointReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """The committed steps, ascending (an unfinished ``<step>.orbax-checkpoint-tmp*`` write is not one)."""
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    """The path of ``step``'s directory, ``<directory>/<step>`` (whether or not it exists)."""
    return os.path.join(self.directory, str(step))

  def _unreadable(self, step: int, err: Exception) -> CheckpointCorruptError:
    msg = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return CheckpointCorruptError(f"checkpoint {self.step_dir(step)} is unreadable ({msg}); it is damaged "
                                  "(truncated, garbled or missing files): pick another step.")

  def saved_arrays(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of the state arrays stored at ``step`` (metadata only). Raises
    CheckpointCorruptError when the metadata cannot be read."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
      tree = getattr(metadata, "tree", metadata)
      if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError("no train state (params) in the metadata")
      return array_names(tree)
    except Exception as err:  # pylint: disable=broad-except  (Orbax/TensorStore raise many types)
      raise self._unreadable(step, err) from err

  def restore_variables(self, step: int, abstract_variables: dict[str, Any], what: str = "the model"
                        ) -> dict[str, Any]:
    """The variables of ``step`` as numpy arrays, in the structure and dtypes of ``abstract_variables``.

    Args:
      step: a committed step (``all_steps()``).
      abstract_variables: {"params": …, other collections…} of arrays or ShapeDtypeStructs (e.g.
        ``jax.eval_shape(model.init, …)``); every array must be in the checkpoint with the same shape.
      what: names the model in the mismatch message.

    Returns:
      {"params": …, "constants": …, "batch_stats": …} (the collections of ``abstract_variables``).

    Raises:
      CheckpointMismatchError: the checkpoint's params / other collections differ in names or shapes (the first
        difference is named, with both shapes).
      CheckpointCorruptError: the step's metadata or arrays cannot be read.
    """
    variables = dict(abstract_variables)
    target = {"params": variables.pop("params")}
    if variables:
      target["model_state"] = variables
    saved = {n: v for n, v in self.saved_arrays(step).items() if n.split(".")[0] in ("params", "model_state")}
    wanted = array_names(target)
    mismatch = first_mismatch(saved, wanted)
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} does not fit {what}: {mismatch} (all differences: "
          f"{describe_mismatch(saved, wanted)}). Was it written by another run or config?")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True)))["state"]
    except Exception as err:  # pylint: disable=broad-except
      raise self._unreadable(step, err) from err
    return {"params": restored["params"], **restored.get("model_state", {})}

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with ``step`` (e.g. {"step", "data_step", "config"}); CheckpointCorruptError when
    it cannot be read."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # pylint: disable=broad-except
      raise self._unreadable(step, err) from err

  def close(self) -> None:
    """Releases the underlying Orbax manager (nothing on disk changes)."""
    self._manager.close()


def restore_variables(directory: str | os.PathLike) -> dict[str, Any]:
  """The variable collections ({"params": …, "batch_stats": …, …}) stored in an Orbax checkpoint directory.

  Accepted: a ``StandardCheckpointer`` directory holding a variables dict (``python -m linformer_jax.convert``),
  a run's ``checkpoints/`` directory (its latest step) or one step of it (``checkpoints/<step>``); a train state's
  ``params`` and ``model_state`` collections are returned as variables.

  Raises:
    FileNotFoundError: ``directory`` is not a directory.
  """
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory at {directory!r}.")
  if any(name.isdigit() for name in os.listdir(directory)):  # a Checkpointer directory: its latest step
    checkpointer = Checkpointer(directory, asynchronous=False)
    try:
      tree, _ = checkpointer.restore_raw()
    finally:
      checkpointer.close()
  else:
    item = os.path.join(directory, "state")  # one step of a Checkpointer directory
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(item if os.path.isdir(item) else directory)
  if "opt_state" in tree and "model_state" in tree:  # a TrainState
    return {"params": tree["params"], **tree["model_state"]}
  return dict(tree)


def take_matching(variables: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
  """``variables`` with every array replaced by the ``loaded`` one at the same collection and path when the shapes
  agree (cast to the target's dtype); the others (e.g. a classifier head of another size) are kept."""
  flat_loaded = flax.traverse_util.flatten_dict(loaded)
  flat = flax.traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    src = flat_loaded.get(key)
    if src is not None and tuple(src.shape) == tuple(value.shape):
      flat[key] = jnp.asarray(src, value.dtype)
  return flax.traverse_util.unflatten_dict(flat)
