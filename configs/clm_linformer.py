"""Byte-level causal LM with the exactly causal Linformer on text files (default: the Python standard library).

    python -m experiments.train --config configs/clm_linformer.py[:ARGS] --workdir DIR
    python -m experiments.generate --workdir DIR --prompt "def "

The data are the main job's (``data.objective="causal"``: every position is scored on the next byte); the model is
``linformer_lm`` with ``causal=True``. ARGS: ``runlocal`` (CI: seconds), ``cpu`` (a few minutes on 2 CPU cores, the
main job's sizes), ``attention=full`` (the causal Transformer baseline), ``k=…``, ``max_len=…``, ``sharing=…``,
``projection=…`` ("learnable" | "fixed": the projections with a causal form). Eval perplexity is per byte: bits per
byte = log2(perplexity).
"""
from configs.common import base_config, parse_arg, runlocal
from configs.sweep import Sweep


def get_config(arg=None):
  a = parse_arg(arg, runlocal=False, cpu=False, attention="linformer", k=128, max_len=512,
                sharing="kv", projection="learnable")
  c = base_config("mlm")
  c.data.objective = "causal"
  c.data.max_len = a.max_len
  c.total_steps = 20000
  c.batch_size = 32
  c.log_every, c.eval_every, c.checkpoint_every = 100, 1000, 1000
  c.eval_max_batches = 20
  c.model.update(name="linformer_lm", dim=256, depth=4, num_heads=4, k=a.k, dim_ff=1024, causal=True,
                 attention=a.attention, sharing=a.sharing, projection=a.projection, dropout=0.1,
                 norm="pre", pos_emb="learned", remat="C0")
  c.optimizer.name = "adafactor"
  c.optimizer.schedule = "rsqrt"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 500
  if a.cpu:  # the main job's sizes (configs/mlm_linformer.py:cpu)
    c.data.max_len = 128
    c.data.num_eval = 256
    c.model.update(dim=128, depth=2, num_heads=4, k=32, dim_ff=512, dropout=0.0)
    c.total_steps, c.batch_size = 600, 32
    c.log_every, c.eval_every, c.checkpoint_every = 25, 200, 200
    c.eval_max_batches = 8
    c.optimizer.warmup_steps = 100
    c.optimizer.learning_rate = 1e-2
  if a.runlocal:
    runlocal(c)
    c.data.max_len, c.data.num_eval, c.data.max_bytes = 64, 16, 200_000
    c.model.update(dim=32, depth=2, num_heads=2, k=16, dim_ff=64, causal_chunk=16)
    c.optimizer.warmup_steps = 2
  return c


def get_sweeps():
  """The ablation sweeps over this config (``configs.sweep.Sweep``); ``--quick`` runs their arms on ``runlocal``."""
  from configs.mlm_linformer import _MLM  # pylint: disable=import-outside-toplevel  (the MLM sweeps' base)
  return [
      Sweep("causal_lm", "clm_linformer:cpu", _MLM,
            (("full", {"model.attention": "full"}), ("linformer", {"model.attention": "linformer"})),
            (0, 1, 2), "eval_perplexity",
            "issue 24: the exactly causal Linformer (k=128, the projection of each prefix) is within 5 % of the causal "
            "Transformer's bits per byte (log2 of the per-byte eval perplexity) at equal steps.",
            "a byte-level causal LM on the Python stdlib sources: 2 layers, d=64, 4 heads, n=512, batch 8, 400 "
            "Adafactor steps, sharing kv, three seeds (the MLM sweeps' settings).", reference="full"),
  ]
