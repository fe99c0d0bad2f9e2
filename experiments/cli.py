"""What the small experiment CLIs share (``experiments.predict``, ``experiments.generate``)."""
from __future__ import annotations

import sys
from typing import Callable


def print_or_exit(produce: Callable[[], str]) -> None:
  """Prints ``produce()``; a ValueError, TypeError or OSError becomes one line ``error: Type: message`` on stderr
  and exit status 1 (argparse's own errors keep status 2)."""
  try:
    print(produce())
  except (ValueError, TypeError, OSError) as err:
    print(f"error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(1)
