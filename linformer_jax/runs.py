"""A training run read back for inference: ``load_model(workdir, step=None) -> (module, variables, config)``.

    module, variables, config = load_model("runs/mlm")
    logits = module.apply(variables, inputs, mask)          # deterministic: no rngs needed

A run's workdir (``linformer_jax.train``) holds:

* ``config.json``: the run's config;
* ``dataset_info.json``: the dataset's ``info`` (``linformer_jax.data``): the model's data-derived fields
  (``vocab_size``, ``max_len``, ``num_classes``) and what inference needs to prepare inputs (token ids, image
  shape, channel mean / std). Runs written before it existed are served by building the dataset from
  ``config.data`` (slower: ListOps may be generated, the MLM corpus read);
* ``checkpoints/<step>/``: Orbax checkpoints of the train state; only committed (fully written) steps count.

The module is built from the saved config by the trainer's own ``steps.build_model``; the variables hold every
collection of the model (``params``, ``constants`` for a fixed Linformer projection, ``batch_stats`` for
BatchNorm), restored without the optimizer state. Nothing in the workdir is written.
"""
from __future__ import annotations

import json
import operator
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from linformer_jax.checkpoint import CheckpointMismatchError, CheckpointReader
from linformer_jax.steps import build_model, model_inputs

#: File name of a run's configuration in its workdir.
CONFIG_FILE = "config.json"
#: File name of a run's dataset info (``Dataset.info``) in its workdir.
DATASET_INFO_FILE = "dataset_info.json"
#: Name of a run's checkpoints directory in its workdir.
CHECKPOINTS_DIR = "checkpoints"


def _json_value(value: Any) -> Any:
  if hasattr(value, "tolist"):  # numpy scalars and arrays
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_dataset_info(workdir: str | os.PathLike, info: dict) -> None:
  """Writes ``info`` (``dataset.info``) to ``<workdir>/dataset_info.json`` atomically (tuples become lists)."""
  path = os.path.join(os.fspath(workdir), DATASET_INFO_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1, default=_json_value)
  os.replace(tmp, path)


def _check_run_dir(workdir: str | os.PathLike) -> str:
  """The workdir as an absolute path; FileNotFoundError / NotADirectoryError unless it is a training run's."""
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir {path!r} does not exist.")
  if not os.path.isdir(path):
    raise NotADirectoryError(f"workdir {path!r} is not a directory.")
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    contents = "is empty" if not os.listdir(path) else f"has no {CONFIG_FILE}"
    raise FileNotFoundError(f"{path!r} is not a training run: it {contents} (a run's workdir holds {CONFIG_FILE}, "
                            f"{DATASET_INFO_FILE} and {CHECKPOINTS_DIR}/, written by python -m experiments.train).")
  return path


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's config from ``<workdir>/config.json``.

  Raises:
    FileNotFoundError / NotADirectoryError: no such directory, or not a training run (no config.json).
    ValueError: config.json is not a JSON object with ``data.name`` and ``model.name``.
  """
  path = os.path.join(_check_run_dir(workdir), CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{path} is not valid JSON ({err}).") from None
  for section in ("data", "model"):
    if not isinstance(data, dict) or not isinstance(data.get(section), dict) or "name" not in data[section]:
      raise ValueError(f"{path} has no {section}.name; it is not a training config.")
  return ml_collections.ConfigDict(data)


def read_dataset_info(workdir: str | os.PathLike, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """The run's ``dataset.info`` as JSON gives it (tuples as lists): ``<workdir>/dataset_info.json``, or (runs
  without it) the info of the dataset built from ``config.data`` (``config``: the run's config; read from the
  workdir when None)."""
  path = os.path.join(_check_run_dir(workdir), DATASET_INFO_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        info = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
      raise ValueError(f"{path} is not valid JSON ({err}); delete it to rebuild it from the config's data "
                       "section.") from None
    if not isinstance(info, dict) or "kind" not in info:
      raise ValueError(f"{path} has no 'kind'; delete it to rebuild it from the config's data section.")
    return info
  from linformer_jax.data import make_dataset  # pylint: disable=import-outside-toplevel
  config = read_config(workdir) if config is None else config
  info = make_dataset(config.data, os.path.dirname(path)).info
  return json.loads(json.dumps(info, default=_json_value))  # as if read from dataset_info.json (lists, not tuples)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The committed checkpoint steps of a run, ascending ([] when there is none)."""
  directory = os.path.join(_check_run_dir(workdir), CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    return []
  with CheckpointReader(directory) as reader:
    return reader.all_steps()


def _pick_step(directory: str, steps: list[int], requested: Optional[int]) -> int:
  """The step to load: ``requested`` (checked against ``steps``) or the latest committed one."""
  if not steps:
    pending = os.path.isdir(directory) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory))
    raise FileNotFoundError(f"{directory} holds no committed checkpoint"
                            + (" (one is still being written: wait for it)." if pending else "."))
  if requested is None:
    return steps[-1]
  try:
    step = operator.index(requested) if not isinstance(requested, bool) else None
  except TypeError:
    step = None
  if step is None:
    raise TypeError(f"step must be an int, got {requested!r}.")
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; available steps: "
                            f"{', '.join(map(str, steps))}.")
  return step


def abstract_variables(module: nn.Module, info: dict) -> dict:
  """The variables of ``module.init`` on inputs shaped by ``info``, as ShapeDtypeStructs (tracing only)."""
  if info["kind"] == "image":
    batch = {"image": jax.ShapeDtypeStruct((1, *info["image_shape"]), jnp.float32)}
  else:
    batch = {"inputs": jax.ShapeDtypeStruct((1, info["max_len"]), jnp.int32),
             "mask": jax.ShapeDtypeStruct((1, info["max_len"]), jnp.bool_)}
  return dict(jax.eval_shape(module.init, jax.eval_shape(jax.random.key, 0), *model_inputs(batch, info["kind"])))


def load_model(workdir: str | os.PathLike, step: Optional[int] = None
               ) -> tuple[nn.Module, dict[str, Any], ml_collections.ConfigDict]:
  """Loads a training run for inference.

  Args:
    workdir: the run's directory (``python -m experiments.train --workdir``).
    step: the checkpoint step; None = the latest committed one.

  Returns:
    ``(module, variables, config)``: the flax module the run trained (built by ``steps.build_model`` from the
    saved config and dataset info; its calls default to inference: ``deterministic=True`` / ``train=False``),
    ``variables`` = {"params": …, and the model's other collections ("constants", "batch_stats")} as jax
    arrays, ready for ``module.apply(variables, *inputs)``, and the run's config (a ConfigDict).

  Raises:
    FileNotFoundError: no such workdir, not a training run (no config.json), no committed checkpoint, or no
      checkpoint of ``step`` (the message lists the available steps). NotADirectoryError: workdir is a file.
    ValueError: an unreadable config.json / dataset_info.json or a model section ``build_model`` rejects.
    linformer_jax.checkpoint.CheckpointCorruptError (a ValueError): the step's files cannot be read.
    linformer_jax.checkpoint.CheckpointMismatchError (a ValueError): the checkpoint does not fit the config's
      model (another run's checkpoint, or an edited config.json): the first differing variable is named with both
      shapes; where every shape agrees, the model fields that differ from those the checkpoint was saved with.
  """
  path = _check_run_dir(workdir)
  config = read_config(path)
  directory = os.path.join(path, CHECKPOINTS_DIR)
  with CheckpointReader(directory) if os.path.isdir(directory) else _NoCheckpoints() as reader:
    step = _pick_step(directory, reader.all_steps(), step)
    info = read_dataset_info(path, config)
    try:
      module = build_model(config.model, info)
    except (ValueError, TypeError) as err:
      raise type(err)(f"{os.path.join(path, CONFIG_FILE)}: {err}") from err
    wanted = abstract_variables(module, info)
    variables = reader.restore_variables(step, wanted, what=f"the model of {os.path.join(path, CONFIG_FILE)} "
                                         f"(model.name={config.model.name!r})")
    _check_model_section(config, reader.meta(step), reader.step_dir(step), os.path.join(path, CONFIG_FILE))
  return module, jax.tree.map(jnp.asarray, variables), config


def _check_model_section(config: ml_collections.ConfigDict, meta: dict, step_dir: str, config_path: str) -> None:
  """CheckpointMismatchError when the model section the checkpoint was saved with differs from config.json's
  (a field that changes no shape would otherwise silently give another model than the one trained)."""
  saved = (meta.get("config") or {}).get("model")
  if not isinstance(saved, dict):  # no config in the checkpoint's metadata: nothing to compare
    return
  now = json.loads(config.model.to_json_best_effort())
  diffs = [f"model.{key}: checkpoint {saved.get(key)!r}, config.json {now.get(key)!r}"
           for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
  if diffs:
    raise CheckpointMismatchError(f"checkpoint {step_dir} was saved with another model config than {config_path}: "
                                  f"{'; '.join(diffs[:8])}. Restore config.json's model section.")


class _NoCheckpoints:
  """Stands in for a CheckpointReader when the run has no checkpoints/ directory."""

  def __enter__(self) -> "_NoCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    pass

  def all_steps(self) -> list[int]:
    return []
