"""The run's working directory: a write probe, a disk-space check and JAX's persistent compilation cache.

All of them fail at start-up, before anything is compiled, with an error that names the workdir and what to do.
"""
from __future__ import annotations

import errno
import os
import pathlib
import shutil
import uuid
from typing import Any, Optional

import jax
import numpy as np

#: Directory of JAX's persistent compilation cache when none is configured (``~`` is expanded when used).
DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "linformer_jax", "jax_cache")
#: Free space required beyond two checkpoints (the kept one and the one being written) by ``check_disk_space``.
DISK_SPACE_MARGIN_BYTES = 16 << 20


def prepare_workdir(workdir: pathlib.Path) -> None:
  """Creates ``workdir`` and writes a probe file into it: an unwritable workdir fails now, not at the first
  checkpoint.

  Raises:
    OSError: of the type the file system raised, naming the workdir.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe.{uuid.uuid4().hex}"  # unique per process, also on a shared file system
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    probe.unlink(missing_ok=True)
  except OSError as err:
    raise type(err)(err.errno, f"workdir={str(workdir)!r} is not writable ({err.strerror or err}); checkpoints, "
                    "metrics and config.json go there: pick a writable --workdir.") from None


def tree_bytes(tree: Any) -> int:
  """Bytes of the array leaves (arrays or ShapeDtypeStructs) of a pytree."""
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def check_disk_space(workdir: pathlib.Path, abstract_state: Any) -> None:
  """Raises OSError(ENOSPC) unless the workdir's file system has room for two checkpoints of ``abstract_state``
  (one being written while the previous one is kept) plus ``DISK_SPACE_MARGIN_BYTES``."""
  state_bytes = tree_bytes(abstract_state)
  need = 2 * state_bytes + DISK_SPACE_MARGIN_BYTES
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise OSError(errno.ENOSPC, f"not enough free disk space in workdir={str(workdir)!r}: {free / 2**20:.1f} MiB "
                  f"free, a checkpoint takes {state_bytes / 2**20:.1f} MiB and a run needs at least "
                  f"{need / 2**20:.1f} MiB; free some space or pick another --workdir.")


def enable_compilation_cache(directory: Optional[str]) -> None:
  """Turns on JAX's persistent compilation cache in ``directory`` (None = ``DEFAULT_COMPILATION_CACHE_DIR``)."""
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory or DEFAULT_COMPILATION_CACHE_DIR))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
