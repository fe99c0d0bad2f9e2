"""Byte-level causal LM with the exactly causal Linformer on text files (default: the Python standard library).

    python -m experiments.train --config configs/clm_linformer.py[:ARGS] --workdir DIR
    python -m experiments.generate --workdir DIR --prompt "def "

The data are the main job's (``data.objective="causal"``: every position is scored on the next byte); the model is
``linformer_lm`` with ``causal=True``. ARGS: ``runlocal`` (CI: seconds), ``cpu`` (a few minutes on 2 CPU cores, the
main job's sizes), ``attention=full`` (the causal Transformer baseline), ``k=…``, ``max_len=…``, ``sharing=…``,
``projection=…`` ("learnable" | "fixed": the projections with a causal form). Eval perplexity is per byte: bits per
byte = log2(perplexity).
"""
from configs import mlm_linformer
from configs.sweep import Sweep


def get_config(arg=None):
  """The main job's config (``configs/mlm_linformer.py``, the same ARGS and sizes) with the causal objective
  (``data.objective="causal"``) and a causal model (``model.causal=True``)."""
  c = mlm_linformer.get_config(arg)
  c.data.objective = "causal"
  c.model.causal = True
  return c


def get_sweeps():
  """The ablation sweeps over this config (``configs.sweep.Sweep``); ``--quick`` runs their arms on ``runlocal``."""
  return [
      Sweep("causal_lm", "clm_linformer:cpu", mlm_linformer._MLM,  # pylint: disable=protected-access (same base)
            (("full", {"model.attention": "full"}), ("linformer", {"model.attention": "linformer"})),
            (0, 1, 2), "eval_perplexity",
            "issue 24: the exactly causal Linformer (k=128, the projection of each prefix) is within 5 % of the causal "
            "Transformer's bits per byte (log2 of the per-byte eval perplexity) at equal steps.",
            "a byte-level causal LM on the Python stdlib sources: 2 layers, d=64, 4 heads, n=512, batch 8, 400 "
            "Adafactor steps, sharing kv, three seeds (the MLM sweeps' settings).", reference="full"),
  ]
