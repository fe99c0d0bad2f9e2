"""Train a model from a config file.

    python -m experiments.train --config configs/NAME.py[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]

The config is locked: a misspelled --config.FIELD is an error. Running again on a DIR that holds checkpoints
resumes from the latest one. Ends by printing the final eval metrics next to the trivial baseline.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from linformer_jax.train import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARGS]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])


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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the console
  final = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(summary(final))


if __name__ == "__main__":
  app.run(main)
