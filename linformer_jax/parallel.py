"""Data parallelism and ZeRO-3-style parameter sharding for the trainer.

Two ways to run the same pure ``train_step``:

* ``parallel="jit"`` (default; the pjit model): ``jax.jit`` with ``NamedSharding`` s over a mesh built by
  :func:`make_mesh` from ``config.mesh`` (e.g. ``{"data": -1, "fsdp": 1}``). The batch is sharded along its
  leading axis over ``("data", "fsdp")``; parameters and optimizer state are replicated (``fsdp == 1``) or each
  array is sharded along its largest dimension divisible by the ``fsdp`` size (:func:`state_shardings`). XLA
  inserts the collectives; the numbers equal the single-device step.
* ``parallel="pmap"``: ``jax.pmap`` over the local devices with ``axis_name="batch"``; the step reduces its
  loss, gradients and metrics with ``lax.psum``/``lax.pmean`` (``make_train_step(..., axis_name="batch")``).

Mesh axes use ``AxisType.Auto`` (``jax.make_mesh`` defaults to Explicit axes in jax >= 0.7).

The trainer builds one ``DataParallel`` per run (``create_data_parallel(config.parallel, config.mesh)``:
``JitDataParallel`` or ``PmapDataParallel``), which owns the placement of the state and the batches, the compiled
train and eval steps and the copy of the state a checkpoint holds, so the loop itself has no per-mode branches.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

#: The mesh axes; the batch is sharded over both, parameters (with fsdp > 1) over ``"fsdp"``.
DATA_AXES = ("data", "fsdp")


def _mesh_dict(mesh_config) -> dict:
  if mesh_config is None:
    return {"data": -1, "fsdp": 1}
  items = dict(mesh_config.items() if hasattr(mesh_config, "items") else mesh_config)
  return {str(k): int(v) for k, v in items.items()}


def mesh_shape(mesh_config, device_count: Optional[int] = None) -> dict:
  """Resolves ``mesh_config`` ({"data": -1, "fsdp": 1}: -1 = the remaining devices) to axis sizes."""
  device_count = jax.device_count() if device_count is None else device_count
  axes = _mesh_dict(mesh_config)
  unknown = set(axes) - set(DATA_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not supported; allowed axes: {list(DATA_AXES)}.")
  free = [k for k, v in axes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh={axes}: at most one axis may be -1 (the remaining devices).")
  bad = [k for k, v in axes.items() if v != -1 and v < 1]
  if bad:
    raise ValueError(f"mesh={axes}: axis sizes must be >= 1 or -1, got {[(k, axes[k]) for k in bad]}.")
  fixed = math.prod(v for v in axes.values() if v != -1)
  if free:
    if device_count % fixed:
      raise ValueError(f"mesh={axes}: the fixed axes ({fixed} devices) do not divide the {device_count} "
                       "devices.")
    axes[free[0]] = device_count // fixed
  for name in DATA_AXES:
    axes.setdefault(name, 1)
  return {name: axes[name] for name in DATA_AXES}


def make_mesh(mesh_config=None, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A ``("data", "fsdp")`` mesh with Auto axes from ``mesh_config`` (dict/ConfigDict; -1 = remaining devices).

  The product of the sizes must equal the device count. Single-process runs may ask for fewer devices than
  there are (the first ``prod`` devices are used, e.g. ``{"data": 1}`` for a one-device run on a multi-device
  host); multi-process runs must use every device.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  total = math.prod(shape.values())
  if total > len(devices) or (total < len(devices) and jax.process_count() > 1):
    raise ValueError(f"mesh={_mesh_dict(mesh_config)} needs {total} devices (data×fsdp = "
                     f"{' × '.join(str(v) for v in shape.values())}) but {len(devices)} devices are available "
                     f"({jax.process_count()} process(es)); use -1 for 'all remaining devices'.")
  names = tuple(shape)
  return jax.make_mesh(tuple(shape.values()), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices[:total])


def replicated(mesh) -> NamedSharding:
  """The sharding that keeps a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis sharded over data×fsdp, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def _fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  if fsdp <= 1:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp == 0 and d >= fsdp and (best is None or d > shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state: Any, mesh) -> Any:
  """NamedShardings for a state pytree: replicated when fsdp == 1; with fsdp > 1 each array is sharded along
  its largest dimension divisible by the fsdp size (ZeRO-3 style), other arrays are replicated."""
  fsdp = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
  return jax.tree.map(lambda a: NamedSharding(mesh, _fsdp_spec(np.shape(a), fsdp)), abstract_state)


def data_parallel_size(mesh) -> int:
  """The number of devices the batch is split over: the product of the mesh's data and fsdp axis sizes."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return math.prod(sizes.get(a, 1) for a in DATA_AXES)


def check_global_batch(batch_size: int, mesh_or_devices, name: str = "batch_size") -> None:
  """ValueError (before compiling) unless the global batch divides over the data×fsdp devices."""
  n = mesh_or_devices if isinstance(mesh_or_devices, int) else data_parallel_size(mesh_or_devices)
  if batch_size % n:
    raise ValueError(f"{name}={batch_size} (the global batch) must be divisible by the {n} data-parallel "
                     f"devices (data×fsdp); use a multiple of {n}.")


def shard_batch(host_batch: Mapping[str, Any], sharding: NamedSharding) -> Any:
  """This process's rows of the global batch → global jax.Arrays (``make_array_from_process_local_data``)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), host_batch)


def put_global(tree: Any, shardings: Any) -> Any:
  """Copies a pytree whose every process holds the full value onto ``shardings`` (fresh buffers: no aliasing
  with the input, so the result may be donated)."""
  host = jax.device_get(tree)
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx, a=a: np.asarray(a)[idx]),
      host, shardings)


# ---- pmap helpers ------------------------------------------------------------------------------------
def pmap_devices(mesh_config=None) -> list:
  """The local devices pmap runs on: data×fsdp devices of the mesh config (fsdp must be 1)."""
  shape = mesh_shape(mesh_config, jax.device_count())
  if shape["fsdp"] != 1:
    raise ValueError(f"parallel='pmap' does not shard parameters (mesh fsdp={shape['fsdp']}); use "
                     "parallel='jit' for fsdp > 1.")
  n = shape["data"]
  if n % jax.process_count() or n // jax.process_count() > jax.local_device_count():
    raise ValueError(f"mesh data={n} does not fit {jax.process_count()} process(es) × "
                     f"{jax.local_device_count()} local devices.")
  if jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f"parallel='pmap' across processes must use every device (mesh data={n}, "
                     f"{jax.device_count()} devices).")
  return jax.local_devices()[:n // jax.process_count()]


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """Stacks a host copy of ``tree`` onto ``devices`` (leading axis = device) for pmap."""
  host = jax.device_get(tree)
  return jax.tree.map(lambda a: _stack_on(a, devices), host)


def _stack_on(a, devices):
  a = np.asarray(a)
  return jax.make_array_from_single_device_arrays(
      (len(devices),) + a.shape, _pmap_sharding(devices, a.ndim + 1),
      [jax.device_put(a[None], d) for d in devices])


def _pmap_sharding(devices, ndim):
  mesh = jax.sharding.Mesh(np.asarray(devices), ("_pmap",))
  return NamedSharding(mesh, P("_pmap", *([None] * (ndim - 1))))


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmapped pytree."""
  return jax.tree.map(lambda a: a[0], tree)


def split_for_pmap(host_batch: Mapping[str, Any], devices: Sequence[jax.Device]) -> Any:
  """Reshapes this process's batch to (devices, per_device, ...) and places one slice on each device."""
  n = len(devices)

  def put(a):
    a = np.asarray(a)
    if a.shape[0] % n:
      raise ValueError(f"the per-process batch of {a.shape[0]} rows must be divisible by the {n} local "
                       "devices.")
    return _stack_on_rows(a.reshape((n, a.shape[0] // n) + a.shape[1:]), devices)

  return jax.tree.map(put, host_batch)


def _stack_on_rows(a, devices):
  return jax.make_array_from_single_device_arrays(
      a.shape, _pmap_sharding(devices, a.ndim), [jax.device_put(a[i:i + 1], d) for i, d in enumerate(devices)])


# ---- one object per run -------------------------------------------------------------------------------
class DataParallel:
  """How a run places its state and batches and runs its steps: built once from the config
  (``create_data_parallel``), then the loop only calls ``train_step``/``eval_step`` and saves ``saved_view``.

  Attributes:
    axis_name: the mapped axis the step functions reduce over (None under ``jax.jit``, "batch" under pmap).
    n_data: the number of data-parallel devices (all processes), which must divide the global batches.
  """
  axis_name: Optional[str] = None
  n_data: int = 1

  def check_batch(self, batch_size: int, name: str) -> None:
    """ValueError unless the global batch ``batch_size`` divides over ``n_data`` devices (``name``: for the
    message)."""
    check_global_batch(batch_size, self.n_data, name)

  def step_model(self, model):
    """The module the train step runs (pmap: cross-replica BatchNorm statistics where the model has them)."""
    return model

  def restore_target(self, state: Any) -> Any:
    """A fresh single-device state → the state a checkpoint is restored into (and the run starts from when there
    is none)."""
    return state

  def place(self, state: Any) -> Any:
    """The restored (or fresh) state → where the steps take it (fresh buffers, safe to donate)."""
    return state

  def compile(self, train_fn, eval_fn, state: Any) -> None:
    """Compiles ``train_fn(state, batch, rng)`` and ``eval_fn(state, batch)`` for ``state``'s placement."""
    raise NotImplementedError

  def make_rng(self, make_key: Callable[[], jax.Array]) -> jax.Array:
    """The key ``make_key()`` returns, where the train step takes it (replicated over the mesh under jit)."""
    return make_key()

  def train_step(self, state: Any, host_batch: Mapping[str, Any], rng: jax.Array):
    """This process's rows of the global batch → (new state, metrics on every device)."""
    return self._train(state, self._batch(host_batch), rng)

  def eval_step(self, state: Any, host_batch: Mapping[str, Any]):
    """This process's rows of the global eval batch → the compiled ``eval_fn``'s metrics (one copy)."""
    return self._eval(state, self._batch(host_batch))

  def saved_view(self, state: Any) -> Any:
    """What a checkpoint holds: one copy of the state."""
    return state


class JitDataParallel(DataParallel):
  """``jax.jit`` with NamedShardings over a ("data", "fsdp") mesh (``state_shardings``: replicated or ZeRO-3)."""

  def __init__(self, mesh_config=None):
    self.mesh = make_mesh(mesh_config)
    self.n_data = data_parallel_size(self.mesh)
    self.batch_sh, self.repl = batch_sharding(self.mesh), replicated(self.mesh)
    self.state_sh = None

  def restore_target(self, state):
    """Global sharded buffers: checkpoints restore straight into them."""
    self.state_sh = state_shardings(state, self.mesh)
    return put_global(state, self.state_sh)

  def make_rng(self, make_key):
    """``make_key()`` computed under ``jax.jit`` as one array replicated over the mesh (also across processes)."""
    return jax.jit(make_key, out_shardings=self.repl)()  # a global array, also across processes

  def compile(self, train_fn, eval_fn, state):
    """Jits both steps with the state's shardings (set by ``restore_target``); the train step donates the state."""
    self._train = jax.jit(train_fn, in_shardings=(self.state_sh, self.batch_sh, self.repl),
                          out_shardings=(self.state_sh, self.repl), donate_argnums=(0,))
    self._eval = jax.jit(eval_fn, in_shardings=(self.state_sh, self.batch_sh), out_shardings=self.repl)

  def _batch(self, host_batch):
    return shard_batch(host_batch, self.batch_sh)


class PmapDataParallel(DataParallel):
  """``jax.pmap`` over the local devices with ``axis_name="batch"``; the state is stacked on a leading device
  axis and checkpoints hold its first replica."""
  axis_name = "batch"

  def __init__(self, mesh_config=None):
    self.devices = pmap_devices(mesh_config)
    self.n_data = len(self.devices) * jax.process_count()

  def step_model(self, model):
    """``model`` with ``bn_axis_name="batch"`` when it has BatchNorm (cross-replica statistics), else ``model``."""
    if getattr(model, "bn_axis_name", "") is None:
      return model.clone(bn_axis_name=self.axis_name)  # cross-replica BatchNorm statistics (SyncBatchNorm)
    return model

  def place(self, state):
    """One copy per device (checkpoints hold one copy, ``saved_view``)."""
    return replicate(state, self.devices)

  def compile(self, train_fn, eval_fn, state):
    """pmaps both steps over the devices (the rng is broadcast, the state donated); ``state`` is unused."""
    del state
    self._pmap_train = jax.pmap(train_fn, axis_name=self.axis_name, in_axes=(0, 0, None), donate_argnums=(0,),
                                devices=self.devices)
    pmap_eval = jax.pmap(eval_fn, axis_name=self.axis_name, devices=self.devices)
    self._eval = lambda state, batch: unreplicate(pmap_eval(state, batch))

  def _train(self, state, batch, rng):
    state, metrics = self._pmap_train(state, batch, rng)
    return state, unreplicate(metrics)

  def _batch(self, host_batch):
    return split_for_pmap(host_batch, self.devices)

  def saved_view(self, state):
    """The first replica of the device-stacked state."""
    return unreplicate(state)


def create_data_parallel(parallel: str, mesh_config=None) -> DataParallel:
  """``parallel`` "jit" | "pmap" and the mesh config → the run's ``DataParallel``."""
  if parallel == "pmap":
    return PmapDataParallel(mesh_config)
  return JitDataParallel(mesh_config)
