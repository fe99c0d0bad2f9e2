"""Byte-level masked LM with a Linformer on text files (default: the Python standard library's sources).

    python -m experiments.train --config configs/mlm_linformer.py[:ARGS] --workdir DIR
ARGS: ``runlocal`` (CI: seconds), ``cpu`` (the main job: a few minutes on 2 CPU cores), ``attention=full``
(the Transformer baseline), ``k=…``, ``max_len=…``, ``sharing=…``, ``projection=…``.

``get_sweeps()``: the ablation sweeps over this config (``python -m experiments.ablate --sweep NAME``,
docs/ablations.md).
"""
from configs.common import base_config, parse_arg, runlocal
from configs.sweep import Sweep


def get_config(arg=None):
  a = parse_arg(arg, runlocal=False, cpu=False, attention="linformer", k=128, max_len=512,
                sharing="kv", projection="learnable")
  c = base_config("mlm")
  c.data.max_len = a.max_len
  c.total_steps = 20000
  c.batch_size = 32
  c.log_every, c.eval_every, c.checkpoint_every = 100, 1000, 1000
  c.eval_max_batches = 20
  c.model.update(name="linformer_lm", dim=256, depth=4, num_heads=4, k=a.k, dim_ff=1024,
                 attention=a.attention, sharing=a.sharing, projection=a.projection, dropout=0.1,
                 norm="pre", pos_emb="learned", remat="C0")
  c.optimizer.name = "adafactor"
  c.optimizer.schedule = "rsqrt"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 500
  if a.cpu:  # the README's main job: a few minutes on 2 CPU cores
    c.data.max_len = 128
    c.data.num_eval = 256
    c.model.update(dim=128, depth=2, num_heads=4, k=32, dim_ff=512, dropout=0.0)
    c.total_steps, c.batch_size = 600, 32
    c.log_every, c.eval_every, c.checkpoint_every = 25, 200, 200
    c.eval_max_batches = 8
    c.optimizer.warmup_steps = 100
    c.optimizer.learning_rate = 1e-2  # measured: eval ppl 16.7 at step 600 vs 19.3 with 3e-3 (unigram 25.8)
  if a.runlocal:
    runlocal(c)
    c.data.max_len, c.data.num_eval, c.data.max_bytes = 64, 16, 200_000
    c.model.update(dim=32, depth=2, num_heads=2, k=16, dim_ff=64)
    c.optimizer.warmup_steps = 2
  return c


# The sweeps' byte-level MLM base: n=512, a 2-layer dim-64 Linformer, Adafactor (the main job's settings).
_MLM = {
    "data.max_len": 512, "data.num_eval": 128, "batch_size": 8, "eval_batch_size": 32, "eval_max_batches": None,
    "model.dim": 64, "model.depth": 2, "model.num_heads": 4, "model.k": 128, "model.dim_ff": 256,
    "model.sharing": "kv", "model.dropout": 0.0, "total_steps": 400, "warmup": 50,
    "log_every": 25, "eval_every": 100, "checkpoint_every": 200, "tensorboard": False,
}
_MLM_CLAIM_K = ("k=128 at n=512 is nearly on par with the Transformer (paper Fig. 3a; target: within 5 % of the "
                "full-attention perplexity); perplexity improves with k.")
_MLM_SHRUNK = ("paper: RoBERTa-base (12 layers, d=768), BookCorpus+Wikipedia, 250k updates of batch 256 on 64 "
               "V100s. Here: 2 layers, d=64, 4 heads, batch 8 × 512 bytes of the Python stdlib sources, 400 "
               "Adafactor steps (1.6 M bytes seen), one seed.")
# The paper's Adafactor (Shazeer & Stern Alg. 4 + §8): factored, d=1, β̂2 = 1 − t^-0.8, relative step, no momentum.
_PAPER_ADAFACTOR = {
    "optimizer.name": "adafactor", "optimizer.schedule": "relative_step", "optimizer.learning_rate": None,
    "optimizer.warmup_steps": 0, "optimizer.factored": True, "optimizer.clipping_threshold": 1.0,
    "optimizer.beta2": None, "optimizer.decay_rate": 0.8, "optimizer.momentum": None,
    "optimizer.multiply_by_parameter_scale": True,
}


def get_sweeps():
  """The ablation sweeps over this config (``configs.sweep.Sweep``); ``--quick`` runs their arms on ``runlocal``."""
  return [
      Sweep("linformer_k", "mlm_linformer:cpu", _MLM,
            (("full", {"model.attention": "full"}), ("k32", {"model.k": 32}), ("k64", {"model.k": 64}),
             ("k128", {"model.k": 128}), ("k256", {"model.k": 256})),
            (0,), "eval_perplexity", _MLM_CLAIM_K, _MLM_SHRUNK, quick={"data.max_len": 256}, reference="full"),
      Sweep("linformer_n", "mlm_linformer:cpu", {**_MLM, "batch_size": 8},
            (("n512", {"data.max_len": 512, "batch_size": 8}),
             ("n1024", {"data.max_len": 1024, "batch_size": 4, "eval_batch_size": 16}),
             ("n2048", {"data.max_len": 2048, "batch_size": 2, "eval_batch_size": 8})),
            (0,), "eval_perplexity",
            "at fixed k, perplexity is about the same across n (paper Fig. 3c/d, k=256, n=512…4096).",
            _MLM_SHRUNK + " k=128; the batch holds 4096 bytes for every n (batch 8/4/2) so each run sees as many "
            "bytes; the eval set is 128 chunks of n bytes, so its text differs between n: every run is therefore "
            "also scored on the same masked bytes (common_eval_*: the n=2048 eval set cut into 2048/n pieces; "
            "each piece is scored with at most n bytes of context).", reference="n512", common_eval=True),
      Sweep("linformer_sharing", "mlm_linformer:cpu", _MLM,
            (("none", {"model.sharing": "none"}), ("headwise", {"model.sharing": "headwise"}),
             ("kv", {"model.sharing": "kv"}), ("layerwise", {"model.sharing": "layerwise"})),
            (0,), "eval_perplexity",
            "layerwise sharing (one E for all layers, heads, K and V) almost matches no sharing (paper Fig. 3b, "
            "k=128, n=512; target: all four modes within 5 % of each other).", _MLM_SHRUNK + " k=128.",
            reference="none"),
      Sweep("linformer_projection", "mlm_linformer:cpu", _MLM,
            tuple((p, {"model.projection": p}) for p in ("learnable", "conv", "mean_pool", "max_pool", "fixed")),
            (0,), "eval_perplexity",
            "the paper proposes pooling and convolution (kernel = stride = n/k) and a fixed random projection "
            "(Thm. 2) as alternatives to learned E/F, without results.", _MLM_SHRUNK + " k=128, sharing kv.",
            reference="learnable"),
      Sweep("linformer_nonuniform_k", "mlm_linformer:cpu", {**_MLM, "model.depth": 4},
            tuple((f"reduce{r}", {"model.k_reduce_by_layer": r}) for r in (0, 16, 32)),
            (0,), "eval_perplexity",
            "the paper proposes a smaller k in higher layers (their spectra are more skewed, Fig. 1) without "
            "evaluating it; layer i projects to k − i·r.", _MLM_SHRUNK.replace("2 layers", "4 layers") +
            " k=128, sharing kv (k_i = 128, 96, 64, 32 for r=32).",
            quick={"model.k": 48}, reference="reduce0"),  # runlocal's 2 layers: k_i = 48, 16 for r=32
      Sweep("adafactor", "mlm_linformer:cpu",
            {"data.max_len": 128, "data.num_eval": 256, "batch_size": 16, "eval_batch_size": 64,
             "eval_max_batches": None, "model.dim": 64, "model.depth": 2, "model.num_heads": 4, "model.k": 32,
             "model.dim_ff": 256, "model.dropout": 0.0, "total_steps": 500, "log_every": 25, "eval_every": 100,
             "checkpoint_every": 500, "tensorboard": False, **_PAPER_ADAFACTOR},
            (("adamw", {"optimizer.name": "adamw", "optimizer.schedule": "rsqrt", "optimizer.learning_rate": 3e-3,
                        "optimizer.warmup_steps": 100, "optimizer.clipping_threshold": None}),
             ("adafactor", {}),
             ("unfactored", {"optimizer.factored": False}),
             ("no_clipping", {"optimizer.clipping_threshold": None}),
             ("beta2_0.999", {"optimizer.beta2": 0.999}),
             ("beta2_0.999_no_clipping", {"optimizer.beta2": 0.999, "optimizer.clipping_threshold": None}),
             ("fixed_lr_warmup", {"optimizer.schedule": "rsqrt", "optimizer.learning_rate": 3e-3,
                                  "optimizer.warmup_steps": 100, "optimizer.multiply_by_parameter_scale": False})),
            (0, 1), "eval_perplexity",
            "Shazeer & Stern 2018 (WMT'14 En→De BLEU): factoring the second moment costs little quality; with a "
            "slow fixed β2 (0.999) and no warmup, training is unstable unless updates are clipped (d=1) or β2 "
            "increases (1 − t^-0.8); Adafactor ≈ Adam at a fraction of the optimizer memory.",
            "paper: Transformer-base on WMT'14 En→De, 100k steps. Here: byte-level MLM, n=128, a 2-layer d=64 "
            "Linformer (k=32), batch 16, 500 steps, two seeds; optimizer-state bytes are exact (eval_shape).",
            quick=_PAPER_ADAFACTOR, reference="adamw"),
  ]
