"""Preemption: SIGTERM/SIGINT handling, the multi-host agreement to stop, and the fault-injection hook.

* ``StopRequest``: the first SIGTERM/SIGINT only records the signal; the training loop then writes a checkpoint
  of the current step and returns (``final["preempted"]``). A second signal gets the previous behaviour.
* ``StopRequest.requested(done, log_every, checkpoint_every)``: single-process runs stop after any step;
  multi-process runs agree (any process signalled) at log and checkpoint steps, so every process writes the same
  checkpoint.
* ``FaultHook``: ``$LINFORMER_JAX_FAULT`` (``KILL@3``, ``KILL@4:save``, ``TERM@5``, ``INT@5``) sends this process a
  signal after that step, or right after that step's asynchronous checkpoint save started: the fault tests' hook.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

import jax
import numpy as np

#: The environment variable that sets a fault to inject (see ``parse_fault``).
FAULT_ENV = "LINFORMER_JAX_FAULT"
#: The signal names ``$LINFORMER_JAX_FAULT`` accepts, and their signals.
FAULT_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


def parse_fault(value: Optional[str]) -> Optional[tuple[int, int, str]]:
  """``$LINFORMER_JAX_FAULT`` → (signal, step, point) or None.

  ``SIGNAL@STEP`` sends SIGNAL (KILL, TERM, INT) to this process once step STEP has been dispatched;
  ``SIGNAL@STEP:save`` right after the asynchronous save of the checkpoint of step STEP started (while it is being
  written).

  Raises:
    ValueError: any other value.
  """
  if not value:
    return None
  sig, _, rest = value.partition("@")
  step, _, point = rest.partition(":")
  if sig not in FAULT_SIGNALS or not step.isdigit() or int(step) < 1 or point not in ("", "save"):
    raise ValueError(f"{FAULT_ENV}={value!r} is not supported; allowed: SIGNAL@STEP or SIGNAL@STEP:save with "
                     f"SIGNAL one of {', '.join(FAULT_SIGNALS)} and STEP >= 1 (e.g. KILL@3, KILL@4:save, TERM@5).")
  return FAULT_SIGNALS[sig], int(step), point or "step"


class FaultHook:
  """Raises the signal of ``$LINFORMER_JAX_FAULT`` at its step (a no-op when the variable is unset)."""

  def __init__(self, value: Optional[str]):
    self.fault = parse_fault(value)

  @classmethod
  def from_env(cls) -> "FaultHook":
    """The hook of this process's ``$LINFORMER_JAX_FAULT`` (ValueError for an unsupported value)."""
    return cls(os.environ.get(FAULT_ENV))

  def after_step(self, done: int, wait_for_checkpoints: Callable[[], None]) -> None:
    """After step ``done`` was dispatched; every earlier checkpoint is committed first (deterministic)."""
    if self.fault and self.fault[1] == done and self.fault[2] == "step":
      wait_for_checkpoints()
      signal.raise_signal(self.fault[0])

  def after_save(self, done: int) -> None:
    """Right after the save of step ``done`` started (synchronous in this thread: deterministic)."""
    if self.fault and self.fault[1] == done and self.fault[2] == "save":
      signal.raise_signal(self.fault[0])


class StopRequest:
  """SIGTERM/SIGINT handler for the training loop.

  The first signal sets ``signum`` (the loop then writes a checkpoint of the current step and returns); a second
  one gets the previous behaviour (exit / KeyboardInterrupt). Only installed in the main thread; ``restore()``
  puts the previous handlers back.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: dict = {}

  def install(self) -> "StopRequest":
    """Installs the SIGTERM/SIGINT handlers (in the main thread only; elsewhere a no-op) and returns ``self``."""
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # asked twice: stop waiting for the checkpoint
      self.restore()
      signal.raise_signal(signum)
      return
    self.signum = signum

  def restore(self) -> None:
    """Puts back the handlers that ``install`` replaced."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous.clear()

  def requested(self, done: int, log_every: int, checkpoint_every: int) -> bool:
    """Whether a SIGTERM/SIGINT arrived. Multi-process runs agree on it (any process signalled) at log and
    checkpoint steps, so all of them write the same checkpoint; single-process runs react after any step."""
    if jax.process_count() == 1:
      return self.signum is not None
    if done % log_every and done % checkpoint_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
    if self.signum is None and np.any(flags):
      self.signum = int(signal.SIGTERM)
    return bool(np.any(flags))
