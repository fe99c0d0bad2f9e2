"""Train a model from a config file.

    python -m experiments.train --config configs/NAME.py[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]

The config is locked: a misspelled --config.FIELD is an error. Running again on a DIR that holds checkpoints
resumes from the latest one. Ends by printing the final eval metrics next to the trivial baseline.

Errors in the flags, the config or the inputs (ValueError, TypeError, OSError such as FileNotFoundError, a
non-finite loss) are printed as one line ``error: ...`` on stderr, without a traceback, and the exit status is
2 (bad flags) or 1. SIGTERM/SIGINT write a checkpoint of the current step and exit 0; the same command continues.
Config files are Python: loading one executes it, like any script — only use config files you trust.

Multi-host (one command per process; see docs/scaling.md "Scaling out"):

    # explicit, e.g. two processes on one machine
    python -m experiments.train ... --coordinator_address=127.0.0.1:29500 --num_processes=2 --process_id=0
    # clusters (TPU pod slices, SLURM, ...): argument-free auto-detection
    LINFORMER_JAX_DISTRIBUTED=1 python -m experiments.train ...
"""
from __future__ import annotations

import ast
import json
import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from linformer_jax.data.listops import RENAMED_ARGS, renamed_arg_error
from linformer_jax.run_config import RENAMED_FIELDS
from linformer_jax.train import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARGS]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints and plots.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.initialize "
                    "(multi-host runs); with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])

DISTRIBUTED_ENV = "LINFORMER_JAX_DISTRIBUTED"


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize with the explicit flags, or argument-free (cluster auto-detection) when
  $LINFORMER_JAX_DISTRIBUTED=1; otherwise nothing (a single process)."""
  import jax
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together.")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes"):
    jax.distributed.initialize()


def summary(final: dict) -> str:
  lines = []
  if "eval_perplexity" in final:
    lines.append(f"final eval perplexity {final['eval_perplexity']:.3f} (masked bytes) vs unigram baseline "
                 f"{final['baseline_unigram_perplexity']:.3f}; masked-byte accuracy "
                 f"{final['eval_accuracy']:.4f}")
  elif "eval_accuracy" in final:
    lines.append(f"final eval accuracy {final['eval_accuracy']:.4f} vs majority-class baseline "
                 f"{final['baseline_majority_accuracy']:.4f}")
  lines.append(json.dumps(final))
  return "\n".join(lines)


def one_line(err: BaseException) -> str:
  """``error: <Type>: <message>`` on one line. An embedded traceback (a config file that raised) is reduced to
  its last line; a missing config field (KeyError / AttributeError from a --config.FIELD override) is named."""
  msg = str(err)
  if isinstance(err, (KeyError, AttributeError)) and err.args:
    msg = str(err.args[0])
    if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":  # a repr'd message
      try:
        msg = str(ast.literal_eval(msg))
      except (ValueError, SyntaxError):
        pass
    field, _, suggestion = msg.partition("\n")
    name = field.strip("'\"")
    if name in RENAMED_ARGS:  # a ListOps field that has a new name: say which, not the nearest spelling
      return f"error: ValueError: {renamed_arg_error(name)}"
    if name in RENAMED_FIELDS:  # --config.compute_dtype=...: now model.dtype / model.param_dtype
      return f"error: ValueError: {RENAMED_FIELDS[name]}"
    return f"error: no such config field {field} (in a --config.FIELD=VALUE override). {' '.join(suggestion.split())}"
  lines = [line.strip() for line in msg.splitlines() if line.strip()]
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    head = msg.split("Traceback (most recent call last)")[0]
    lines = [head.strip(), lines[-1]]
  return f"error: {type(err).__name__}: {' '.join(' '.join(lines).split())}"


def fail(err: BaseException, status: int) -> NoReturn:
  print(one_line(err), file=sys.stderr)
  sys.exit(status)


def parse_flags(argv):
  """absl flag parsing that reports a bad flag, a misspelled --config.FIELD or a config file that raises in one
  line (exit status 2) instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    fail(err, 2)
  except (KeyError, AttributeError, ValueError, TypeError, OSError) as err:
    fail(err, 2)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the console
  try:
    maybe_initialize_distributed()
    final = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, TypeError, OSError, FloatingPointError) as err:
    fail(err, 1)
  import jax
  if jax.process_index() == 0:
    if final.get("preempted"):
      print(f"stopped by SIG{final['signal'].removeprefix('SIG')} after step {final['step']}; checkpoint written to "
            f"{final['checkpoint']}. Run the same command again to continue.")
    else:
      print(summary(final))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
