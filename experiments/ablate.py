"""Ablation sweeps: every run of a sweep through the normal trainer, then JSON + markdown + PNG.

    python -m experiments.ablate --sweep NAME --out DIR [--quick] [--seeds 0,1,2] [--arms a,b]
    python -m experiments.ablate --list

Each run (arm × seed) trains in its own workdir ``DIR/NAME/<arm>_seed<s>`` with
``linformer_jax.train.train_and_evaluate`` (so it resumes from its checkpoints if interrupted); a finished run
leaves ``ablate_run.json`` there and is skipped next time. Afterwards the sweep writes ``DIR/NAME.json`` (one row
per run: config overrides, final eval metrics, steps, wall time, eval curve, parameter count and optimizer-state
bytes; plus one summary row per arm with the mean ± std over seeds), ``DIR/NAME.md`` and ``DIR/NAME.png``
(eval curves per arm, mean over seeds).

A sweep = a base config (``configs/<file>.py:get_config(arg)``) + sweep-wide dotted overrides + named arms
(dicts of dotted overrides) × seeds. ``seed`` (model init, dropout) varies over the seed set; the data (its
order, masking and eval/test sets) are the same for every run. ``--quick`` runs each sweep's 1–2 tiny arms for a
few steps (the tests). ListOps runs also evaluate the *test* split from the final checkpoint once training is
done. Sweeps over the sequence length (``linformer_n``) also score every final checkpoint on the *same* masked
bytes (``common_eval_*``: the eval set of the sweep's longest n, cut into pieces of each run's n). A run that
stops on a non-finite loss is recorded as ``diverged`` (with the trainer's message) instead of failing the sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Optional, Sequence

RUN_MARKER = "ablate_run.json"


@dataclasses.dataclass(frozen=True)
class Sweep:
  """name; config "module:arg" of the base config; base: dotted overrides for the full sweep; arms:
  ((arm name, overrides), ...); seeds: the full seed set; quick_base / quick_arms: the tiny --quick variant
  (its base config is ``module:runlocal``); metric: the headline eval metric; claim: the paper's claim;
  shrunk: what the full sweep shrank relative to the paper; test_split: also evaluate the "test" split;
  reference: the arm whose mean headline metric the others are divided by (the "vs" column); common_eval: also
  score every run on the same bytes (MLM sweeps over data.max_len; the "vs" column then uses that score)."""
  name: str
  config: str
  base: dict
  arms: tuple
  seeds: tuple
  quick_base: dict
  quick_arms: tuple
  metric: str
  claim: str
  shrunk: str
  test_split: bool = False
  reference: Optional[str] = None  # arm the others are compared with (metric ratio column)
  common_eval: bool = False

  @property
  def ratio_metric(self) -> str:
    """The metric of the "÷ reference" column."""
    return "common_eval_perplexity" if self.common_eval else self.metric

  def base_for(self, quick: bool) -> dict:
    return self.quick_base if quick else self.base

  def arms_for(self, quick: bool) -> tuple:
    return self.quick_arms if quick else self.arms

  def seeds_for(self, quick: bool) -> tuple:
    return (self.seeds[0],) if quick else self.seeds


# ---------------------------------------------------------------------------------------------------------------
# The sweeps. Byte-level MLM base: n=512, a 2-layer dim-64 Linformer, Adafactor (the main job's settings).

_MLM = {
    "data.max_len": 512, "data.num_eval": 128, "batch_size": 8, "eval_batch_size": 32, "eval_max_batches": None,
    "model.dim": 64, "model.depth": 2, "model.num_heads": 4, "model.k": 128, "model.dim_ff": 256,
    "model.sharing": "kv", "model.dropout": 0.0, "total_steps": 400, "warmup": 50,
    "log_every": 25, "eval_every": 100, "checkpoint_every": 200, "tensorboard": False,
}
_MLM_QUICK = {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "eval_max_batches": 1,
              "plots": False, "tensorboard": False, "data.max_len": 32, "model.k": 8, "model.depth": 1}
_MLM_CLAIM_K = ("k=128 at n=512 is nearly on par with the Transformer (paper Fig. 3a; target: within 5 % of the "
                "full-attention perplexity); perplexity improves with k.")
_MLM_SHRUNK = ("paper: RoBERTa-base (12 layers, d=768), BookCorpus+Wikipedia, 250k updates of batch 256 on 64 "
               "V100s. Here: 2 layers, d=64, 4 heads, batch 8 × 512 bytes of the Python stdlib sources, 400 "
               "Adafactor steps (1.6 M bytes seen), one seed.")

_LISTOPS = {"checkpoint_every": 500, "log_every": 50, "tensorboard": False, "data.max_length": 200,
            "data.max_len": 200, "model.dim": 64, "model.dim_ff": 128, "model.mlp_dim": 128}
_LISTOPS_QUICK = {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "eval_max_batches": 1,
                  "plots": False, "tensorboard": False, "model.depth": 1}
_LISTOPS_CLAIM = ("LRA Table 1: Linformer 35.70, Transformer 36.37 test accuracy (majority class ≈ 17 %; runs stuck "
                  "there did not learn). Targets: Linformer ≥ 35.7, Transformer ≥ 36.4.")

SWEEPS = {s.name: s for s in [
    Sweep("linformer_k", "mlm_linformer:cpu", _MLM,
          (("full", {"model.attention": "full"}), ("k32", {"model.k": 32}), ("k64", {"model.k": 64}),
           ("k128", {"model.k": 128}), ("k256", {"model.k": 256})),
          (0,), _MLM_QUICK, (("full", {"model.attention": "full"}), ("k8", {"model.k": 8})),
          "eval_perplexity", _MLM_CLAIM_K, _MLM_SHRUNK, reference="full"),
    Sweep("linformer_n", "mlm_linformer:cpu",
          {**_MLM, "batch_size": 8},
          (("n512", {"data.max_len": 512, "batch_size": 8}),
           ("n1024", {"data.max_len": 1024, "batch_size": 4, "eval_batch_size": 16}),
           ("n2048", {"data.max_len": 2048, "batch_size": 2, "eval_batch_size": 8})),
          (0,), _MLM_QUICK, (("n32", {"data.max_len": 32}), ("n64", {"data.max_len": 64})),
          "eval_perplexity",
          "at fixed k, perplexity is about the same across n (paper Fig. 3c/d, k=256, n=512…4096).",
          _MLM_SHRUNK + " k=128; the batch holds 4096 bytes for every n (batch 8/4/2) so each run sees as many "
          "bytes; the eval set is 128 chunks of n bytes, so its text differs between n: every run is therefore "
          "also scored on the same masked bytes (common_eval_*: the n=2048 eval set cut into 2048/n pieces; "
          "each piece is scored with at most n bytes of context).", reference="n512", common_eval=True),
    Sweep("linformer_sharing", "mlm_linformer:cpu", _MLM,
          (("none", {"model.sharing": "none"}), ("headwise", {"model.sharing": "headwise"}),
           ("kv", {"model.sharing": "kv"}), ("layerwise", {"model.sharing": "layerwise"})),
          (0,), _MLM_QUICK, (("none", {"model.sharing": "none"}), ("layerwise", {"model.sharing": "layerwise"})),
          "eval_perplexity",
          "layerwise sharing (one E for all layers, heads, K and V) almost matches no sharing (paper Fig. 3b, "
          "k=128, n=512; target: all four modes within 5 % of each other).", _MLM_SHRUNK + " k=128.", reference="none"),
    Sweep("linformer_projection", "mlm_linformer:cpu", _MLM,
          tuple((p, {"model.projection": p}) for p in ("learnable", "conv", "mean_pool", "max_pool", "fixed")),
          (0,), _MLM_QUICK, (("conv", {"model.projection": "conv"}),), "eval_perplexity",
          "the paper proposes pooling and convolution (kernel = stride = n/k) and a fixed random projection "
          "(Thm. 2) as alternatives to learned E/F, without results.", _MLM_SHRUNK + " k=128, sharing kv.",
          reference="learnable"),
    Sweep("linformer_nonuniform_k", "mlm_linformer:cpu", {**_MLM, "model.depth": 4},
          tuple((f"reduce{r}", {"model.k_reduce_by_layer": r}) for r in (0, 16, 32)),
          (0,), {**_MLM_QUICK, "model.k": 16, "model.depth": 2}, (("reduce4", {"model.k_reduce_by_layer": 4}),),
          "eval_perplexity",
          "the paper proposes a smaller k in higher layers (their spectra are more skewed, Fig. 1) without "
          "evaluating it; layer i projects to k − i·r.", _MLM_SHRUNK.replace("2 layers", "4 layers") +
          " k=128, sharing kv (k_i = 128, 96, 64, 32 for r=32).", reference="reduce0"),
    Sweep("lra_listops", "listops_linformer:cpu",
          {**_LISTOPS, "total_steps": 2000, "eval_every": 100, "warmup": 200},
          (("linformer", {"model.attention": "linformer"}), ("transformer", {"model.attention": "full"})),
          (0,), _LISTOPS_QUICK, (("linformer", {"model.attention": "linformer"}),), "eval_accuracy", _LISTOPS_CLAIM,
          "LRA: 96k train examples of length 500–2000, 4 layers, d=512, 8 heads, 5k steps of batch 32. Here "
          "(configs/listops_*.py:cpu, shrunk further): 4,000 train / 500 val / 500 test generated examples of "
          "length 50–200 (max_len 200), 2 layers, d=64, 4 heads, FF 128, MLP head 128, k=16 (kv-shared, as "
          "LRA), 2,000 steps of batch 32 (16 epochs), LRA's AdamW(0.9, 0.98, wd 0.1) + rsqrt schedule (peak "
          "1.58e-3) with warmup 200, dropout 0.1; one seed.",
          test_split=True, reference="transformer"),
    Sweep("lra_listops_long", "listops_linformer:cpu",
          {**_LISTOPS, "data.num_train": 96000, "data.num_eval": 2000, "data.num_test": 2000, "warmup": 1000,
           "eval_every": 250, "model.pos_emb": "learned"},
          (("linformer", {"model.attention": "linformer", "total_steps": 20000}),
           ("transformer", {"model.attention": "full", "total_steps": 8000})),
          (0, 1), {**_LISTOPS_QUICK, "model.pos_emb": "learned"}, (("linformer", {"model.attention": "linformer"}),),
          "eval_accuracy",
          _LISTOPS_CLAIM,
          "as lra_listops (lengths 50–200, 2 layers, d=64, 4 heads, FF 128, k=16 kv-shared, LRA's AdamW + rsqrt) "
          "but with LRA's data size (96,000 train / 2,000 val / 2,000 test examples), LRA's warmup of 1,000 steps, "
          "learned position embeddings (LRA's learn_pos_emb option; its ListOps config uses fixed sinusoids, with "
          "which both models stop at the outermost-operator lookup table here) and about an hour of one CPU core "
          "per arm: 20,000 steps for the Linformer, 8,000 for the 2.5× slower Transformer (LRA: 5,000 of a "
          "512-wide 4-layer model); two seeds. The arms are independent: run them side by side with --arms.",
          test_split=True, reference="transformer"),
    Sweep("xcit_components", "digits_xcit",
          {"model.depth": 2, "model.embed_dim": 64, "model.num_heads": 4, "model.cls_attn_layers": 1,
           "model.drop_path_rate": 0.0, "total_steps": 300, "warmup": 30, "log_every": 25, "eval_every": 75,
           "checkpoint_every": 300, "tensorboard": False},
          (("xca", {}), ("self_attention", {"model.attention": "self"}), ("no_lpi", {"model.use_lpi": False}),
           ("no_qk_l2norm", {"model.normalize_qk": False}),
           ("fixed_temperature", {"model.learnable_temperature": False}), ("patch16", {"model.patch_size": 16})),
          (0, 1, 2), {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                      "eval_max_batches": 1, "plots": False, "tensorboard": False, "warmup": 1},
          (("xca", {}), ("self_attention", {"model.attention": "self"})), "eval_accuracy",
          "XCiT (El-Nouby et al. 2021) ablates these components on ImageNet with XCiT-S12 (its table's numbers "
          "are not in our reference notes): the ℓ2-normalisation of q/k is needed for stable training, the "
          "learnable temperature restores expressiveness, LPI (patch-to-patch communication) matters, and "
          "patch 8 beats patch 16 for every model size (e.g. L24: 84.4 vs 82.9 top-1, 224²); self-attention "
          "instead of XCA costs quadratic time in the number of tokens.",
          "paper: ImageNet-1k, XCiT-S12 (d=384, 12 layers), 400 epochs. Here: scikit-learn digits (1,500 train "
          "/ 297 eval, 32×32), XCiT with 2 XCA layers + 1 class-attention layer, d=64, 4 heads, 300 AdamW "
          "steps of batch 64 (13 epochs, cosine schedule, peak 1e-3, wd 0.05), three seeds. CIFAR-10: add "
          "--set data.name=cifar10 --set data.path=DIR.", reference="xca"),
    Sweep("adafactor", "mlm_linformer:cpu",
          {"data.max_len": 128, "data.num_eval": 256, "batch_size": 16, "eval_batch_size": 64,
           "eval_max_batches": None, "model.dim": 64, "model.depth": 2, "model.num_heads": 4, "model.k": 32,
           "model.dim_ff": 256, "model.dropout": 0.0, "total_steps": 500, "log_every": 25, "eval_every": 100,
           "checkpoint_every": 500, "tensorboard": False,
           # the paper's Adafactor (Alg. 4 + §8): factored, d=1, β̂2 = 1 − t^-0.8, relative step, no momentum
           "optimizer.name": "adafactor", "optimizer.schedule": "relative_step", "optimizer.learning_rate": None,
           "optimizer.warmup_steps": 0, "optimizer.factored": True, "optimizer.clipping_threshold": 1.0,
           "optimizer.beta2": None, "optimizer.decay_rate": 0.8, "optimizer.momentum": None,
           "optimizer.multiply_by_parameter_scale": True},
          (("adamw", {"optimizer.name": "adamw", "optimizer.schedule": "rsqrt", "optimizer.learning_rate": 3e-3,
                      "optimizer.warmup_steps": 100, "optimizer.clipping_threshold": None}),
           ("adafactor", {}),
           ("unfactored", {"optimizer.factored": False}),
           ("no_clipping", {"optimizer.clipping_threshold": None}),
           ("beta2_0.999", {"optimizer.beta2": 0.999}),
           ("beta2_0.999_no_clipping", {"optimizer.beta2": 0.999, "optimizer.clipping_threshold": None}),
           ("fixed_lr_warmup", {"optimizer.schedule": "rsqrt", "optimizer.learning_rate": 3e-3,
                                "optimizer.warmup_steps": 100, "optimizer.multiply_by_parameter_scale": False})),
          (0, 1), {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                   "eval_max_batches": 1, "plots": False, "tensorboard": False, "data.max_len": 32, "model.k": 8,
                   "optimizer.schedule": "relative_step", "optimizer.learning_rate": None,
                   "optimizer.warmup_steps": 0},
          (("adamw", {"optimizer.name": "adamw", "optimizer.schedule": "rsqrt", "optimizer.learning_rate": 3e-3,
                      "optimizer.warmup_steps": 1}),
           ("unfactored", {"optimizer.factored": False})),
          "eval_perplexity",
          "Shazeer & Stern 2018 (WMT'14 En→De BLEU): factoring the second moment costs little quality; with a "
          "slow fixed β2 (0.999) and no warmup, training is unstable unless updates are clipped (d=1) or β2 "
          "increases (1 − t^-0.8); Adafactor ≈ Adam at a fraction of the optimizer memory.",
          "paper: Transformer-base on WMT'14 En→De, 100k steps. Here: byte-level MLM, n=128, a 2-layer d=64 "
          "Linformer (k=32), batch 16, 500 steps, two seeds; optimizer-state bytes are exact (eval_shape).",
          reference="adamw"),
]}

# "warmup" in the dicts above is a shorthand for optimizer.warmup_steps.
ALIASES = {"warmup": "optimizer.warmup_steps"}


# ---------------------------------------------------------------------------------------------------------------
# Configs


def set_dotted(config, key: str, value) -> None:
  key = ALIASES.get(key, key)
  target = config
  *parents, leaf = key.split(".")
  for p in parents:
    target = target[p]
  if leaf not in target and parents != ["model"]:  # model fields are module kwargs: new ones may be added
    raise ValueError(f"unknown config field {key!r}.")
  target[leaf] = value


def base_config(sweep: Sweep, quick: bool):
  module, _, arg = sweep.config.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config("runlocal" if quick else (arg or None))
  for key, value in sweep.base_for(quick).items():
    set_dotted(config, key, value)
  return config


def run_config(sweep: Sweep, overrides: dict, seed: int, quick: bool, extra: Optional[dict] = None):
  config = base_config(sweep, quick)
  for key, value in {**overrides, **(extra or {})}.items():
    set_dotted(config, key, value)
  config.seed = seed
  return config


def run_key(sweep: Sweep, overrides: dict, seed: int, quick: bool, extra: Optional[dict] = None) -> str:
  """Identity of a run: its base config, the sweep's and the arm's overrides, extra overrides and seed (not the
  whole resolved config, so that a new default field elsewhere does not invalidate finished runs)."""
  drop = lambda d: {k: v for k, v in (d or {}).items() if k != "total_steps"}  # a run can be extended
  spec = {"config": sweep.config, "quick": quick, "base": drop(sweep.base_for(quick)),
          "arm": drop(overrides), "extra": drop(extra), "seed": seed}
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# One run


def _state_sizes(config, workdir) -> dict:
  """Parameter count and optimizer-state bytes (exact, from eval_shape; no compilation)."""
  import jax
  import numpy as np
  from linformer_jax.data import make_dataset
  from linformer_jax.optim import make_optimizer
  from linformer_jax.train import build_model
  dataset = make_dataset(config.data, str(workdir))
  model = build_model(config.model, dataset.info)
  batch = dataset.batch_at(0, min(2, config.batch_size))
  inputs = (batch["image"],) if dataset.info["kind"] == "image" else (batch["inputs"], batch["mask"])
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  params = variables["params"]
  opt = jax.eval_shape(make_optimizer(config.optimizer, config.total_steps).tx.init, params)
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  return {"param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
          "param_bytes": nbytes(params), "opt_state_bytes": nbytes(opt)}


def _restore_final(config, workdir):
  """(dataset, restored final TrainState, its step, jitted eval_step) of a finished run."""
  import jax
  from linformer_jax import checkpoint as ckpt_lib
  from linformer_jax import train as tr
  from linformer_jax.data import make_dataset
  from linformer_jax.optim import make_optimizer
  dataset = make_dataset(config.data, str(workdir))
  kind = dataset.info["kind"]
  model = tr.build_model(config.model, dataset.info)
  tx = make_optimizer(config.optimizer, config.total_steps).tx
  state = tr.init_state(model, tx, dataset.batch_at(0, config.batch_size), kind, jax.random.key(config.seed))
  checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", asynchronous=False)
  try:
    step = checkpointer.latest_step()
    state, _ = checkpointer.restore(step, state)
  finally:
    checkpointer.close()
  return dataset, state, int(step), jax.jit(tr.make_eval_step(model, kind))


def evaluate_split(config, workdir, split: str) -> dict:
  """Accuracy/loss on ``split`` of the final checkpoint in ``workdir`` (public pieces of linformer_jax.train)."""
  from linformer_jax.train import eval_sums
  dataset, state, step, eval_step = _restore_final(config, workdir)
  bs = config.get("eval_batch_size") or config.batch_size
  totals = eval_sums(eval_step, state, dataset.eval_batches(bs, split=split))
  w = max(totals["weight"], 1.0)
  out = {f"{split}_loss": totals["loss"] / w, f"{split}_accuracy": totals["correct"] / w,
         f"{split}_examples": int(totals["weight"]), f"{split}_checkpoint_step": step}
  if hasattr(dataset, "outer_operator_accuracy"):  # ListOps: the same split's outermost-operator baseline
    out[f"{split}_baseline_outer_operator_accuracy"] = dataset.outer_operator_accuracy(split)
  return out


def common_eval_len(sweep: Sweep, quick: bool, extra: Optional[dict] = None) -> int:
  """The longest data.max_len over all of the sweep's arms (not only those selected with --arms)."""
  return max(run_config(sweep, o, 0, quick, extra).data.max_len for _, o in sweep.arms_for(quick))


def evaluate_common(config, workdir, length: int) -> dict:
  """MLM loss/accuracy/perplexity of the final checkpoint on the same masked bytes for every n: the eval set of
  ``data.max_len = length`` (same corpus, seed and num_eval), each of its chunks cut into ``length / n`` pieces
  of this run's n = data.max_len (so every byte is scored with at most n bytes of context)."""
  import ml_collections
  import numpy as np
  from linformer_jax.data import make_dataset
  from linformer_jax.train import eval_sums
  n = config.data.max_len
  if length % n:
    raise ValueError(f"common eval length {length} must be a multiple of data.max_len={n}.")
  own, state, step, eval_step = _restore_final(config, workdir)
  if own.info["kind"] != "mlm":
    raise ValueError(f"common_eval needs an MLM sweep, got data kind {own.info['kind']!r}.")
  common = ml_collections.ConfigDict(config.data.to_dict())
  common.max_len = length
  dataset = make_dataset(common, str(workdir))
  rows = max(1, (config.get("eval_batch_size") or config.batch_size) * n // length)

  def pieces():
    for batch in dataset.eval_batches(rows):
      valid = batch["valid"]
      cut = {k: np.asarray(batch[k])[valid].reshape(-1, n) for k in ("inputs", "targets", "weights", "mask")}
      real = cut["mask"].any(-1)  # drop pieces of pure padding (the corpus' last chunk)
      yield {k: v[real] for k, v in cut.items()}

  totals = eval_sums(eval_step, state, pieces())
  w = max(totals["weight"], 1.0)
  loss = totals["loss"] / w
  return {"common_eval_loss": loss, "common_eval_accuracy": totals["correct"] / w,
          "common_eval_perplexity": float(np.exp(min(loss, 50.0))), "common_eval_bytes": int(totals["weight"]),
          "common_eval_len": int(length), "common_eval_checkpoint_step": step}


def _curve(metrics: list, metric: str) -> list:
  return [[r["step"], r[metric]] for r in metrics if metric in r]


def run_one(sweep: Sweep, arm: str, overrides: dict, seed: int, out: pathlib.Path, quick: bool,
            extra: Optional[dict] = None, log=print) -> dict:
  """Trains one run (or returns its recorded row if it already finished) → row dict."""
  import jax
  from linformer_jax import train as train_lib
  from linformer_jax.metrics import read_metrics
  config = run_config(sweep, overrides, seed, quick, extra)
  workdir = out / sweep.name / f"{arm}_seed{seed}"
  marker = workdir / RUN_MARKER
  key = run_key(sweep, overrides, seed, quick, extra)
  if marker.exists():
    row = json.loads(marker.read_text())
    if row.get("run_key") != key:
      raise ValueError(f"{workdir} holds a finished run of another config (run key {row.get('run_key')} != "
                       f"{key}); delete it or use another --out.")
    if row["steps"] > config.total_steps and row["status"] == "ok":
      raise ValueError(f"{workdir} holds a run of {row['steps']} steps, more than total_steps="
                       f"{config.total_steps}; pass --total_steps {row['steps']} or use another --out.")
    if row["steps"] == config.total_steps or row["status"] != "ok":
      if sweep.common_eval and row["status"] == "ok" and "common_eval_perplexity" not in row["final"]:
        row["final"].update(evaluate_common(config, workdir, common_eval_len(sweep, quick, extra)))
        marker.write_text(json.dumps(_plain(row), indent=1, allow_nan=False))  # a run recorded without it
        log(f"[{sweep.name}] {arm} seed {seed}: added common_eval_perplexity "
            f"{row['final']['common_eval_perplexity']:.3f}")
      row["skipped"] = True
      log(f"[{sweep.name}] {arm} seed {seed}: done already, skipped")
      return row
    if config.optimizer.schedule == "cosine":
      raise ValueError(f"{workdir} holds a finished run of {row['steps']} steps; it cannot be extended to "
                       f"{config.total_steps} because the cosine schedule depends on total_steps.")
    previous_wall = row["wall_time_s"]  # extend: resume from the final checkpoint (the schedule and the
    marker.unlink()                     # step-indexed data do not depend on total_steps, so this equals a
    log(f"[{sweep.name}] {arm} seed {seed}: extending {row['steps']} → {config.total_steps} steps")  # longer run)
  else:
    previous_wall = 0.0
  log(f"[{sweep.name}] {arm} seed {seed}: training {config.total_steps} steps in {workdir}")
  t0 = time.perf_counter()
  status, error, final = "ok", None, {}
  try:
    final = train_lib.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # recorded, not fatal: instability is a result of some ablations
    status, error = "diverged", str(e)
  if final.get("preempted"):  # SIGTERM/SIGINT: the trainer wrote a checkpoint; the run is not finished
    raise SweepStopped(f"[{sweep.name}] {arm} seed {seed}: stopped by {final['signal']} after step "
                       f"{final['step']} (checkpoint written in {workdir}); run the same command again to "
                       "continue.")
  wall = time.perf_counter() - t0 + previous_wall
  metrics = read_metrics(workdir)
  row = {"sweep": sweep.name, "arm": arm, "seed": seed, "overrides": {**overrides, **(extra or {})},
         "status": status, "error": error, "wall_time_s": wall,
         "steps": final.get("step", max([r["step"] for r in metrics], default=0)),
         "final": {k: v for k, v in final.items() if k != "step"},
         "eval_curve": _curve(metrics, sweep.metric),
         "train_loss_curve": _curve(metrics, "loss"),
         "steps_per_s": statistics.median([r["steps_per_s"] for r in metrics  # the first row includes compilation
                                           if "steps_per_s" in r and "time_to_first_step_s" not in r] or [0.0]),
         "time_to_first_step_s": next((r["time_to_first_step_s"] for r in metrics
                                       if "time_to_first_step_s" in r), None),
         "run_key": key, "config": json.loads(config.to_json_best_effort())}
  row.update(_state_sizes(config, workdir))
  if sweep.test_split and status == "ok":
    row["final"].update(evaluate_split(config, workdir, "test"))
  if sweep.common_eval and status == "ok":
    row["final"].update(evaluate_common(config, workdir, common_eval_len(sweep, quick, extra)))
  jax.clear_caches()
  row = _plain(row)
  marker.write_text(json.dumps(row, indent=1, allow_nan=False))
  shown = {k: v for k, v in row["final"].items() if isinstance(v, float)}
  log(f"[{sweep.name}] {arm} seed {seed}: {status} in {wall:.0f}s {json.dumps(shown)}")
  return row


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and outputs


def _headline(sweep: Sweep) -> list:
  keys = [sweep.metric]
  if sweep.test_split:
    keys.append("test_accuracy")
  if sweep.metric == "eval_perplexity":
    keys.append("eval_accuracy")
  if sweep.common_eval:
    keys += ["common_eval_perplexity", "common_eval_accuracy"]
  return keys


def summarize(sweep: Sweep, rows: list) -> list:
  """One row per arm: mean ± std (over seeds; std = 0 for one seed) of the headline metrics."""
  out = []
  for arm in dict.fromkeys(r["arm"] for r in rows):
    runs = [r for r in rows if r["arm"] == arm]
    ok = [r for r in runs if r["status"] == "ok"]
    s = {"arm": arm, "overrides": runs[0]["overrides"], "seeds": [r["seed"] for r in runs],
         "diverged": sum(r["status"] != "ok" for r in runs), "steps": max(r["steps"] for r in runs),
         "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
         "steps_per_s": statistics.mean(r["steps_per_s"] for r in runs),
         "param_count": runs[0]["param_count"], "opt_state_bytes": runs[0]["opt_state_bytes"]}
    for key in _headline(sweep):
      vals = [r["final"][key] for r in ok if key in r["final"]]
      s[key + "_mean"] = statistics.mean(vals) if vals else None
      s[key + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else (0.0 if vals else None)
    out.append(s)
  ref = next((s for s in out if s["arm"] == sweep.reference), None)
  for s in out:
    mean, ref_mean = s[sweep.ratio_metric + "_mean"], ref and ref[sweep.ratio_metric + "_mean"]
    s["vs_reference"] = mean / ref_mean if mean is not None and ref_mean else None
  return out


def _fmt(mean, std, n, pct=False):
  if mean is None:
    return "–"
  scale = 100.0 if pct else 1.0
  text = f"{mean * scale:.2f}"
  return text + (f" ± {std * scale:.2f}" if n > 1 else "")


def _bytes(n):
  return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def write_markdown(sweep: Sweep, rows: list, summary: list, path: pathlib.Path, quick: bool, machine: dict,
                   extra: Optional[dict] = None) -> None:
  from experiments.bench_common import markdown_table
  pct = sweep.metric == "eval_accuracy"
  table = []
  for s in summary:
    n = len(s["seeds"]) - s["diverged"]
    t = {"arm": s["arm"], "overrides": ", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "(base)",
         "seeds": len(s["seeds"]), "diverged": s["diverged"], "steps": s["steps"]}
    for key in _headline(sweep):
      name = key + (" %" if "accuracy" in key else "")
      t[name] = _fmt(s[key + "_mean"], s[key + "_std"], n, pct="accuracy" in key)
    if sweep.reference:
      t[f"÷ {sweep.reference}"] = "–" if s["vs_reference"] is None else f"{s['vs_reference']:.3f}"
    t.update({"params": s["param_count"], "opt state": _bytes(s["opt_state_bytes"]),
              "steps/s": f"{s['steps_per_s']:.2f}", "wall s/run": f"{s['wall_time_s']:.0f}"})
    table.append(t)
  module, _, arg = sweep.config.partition(":")
  arg = "runlocal" if quick else arg
  baselines = {}  # baseline_* entries of the first run that has each (the same data for every run)
  for r in rows:
    for k, v in r["final"].items():
      if k.startswith(("baseline_", "test_baseline_")) and v is not None:
        baselines.setdefault(k, v)
  base_text = "; ".join(f"{_BASELINE_NAMES.get(k.removeprefix('test_'), k)}"
                        f"{' (test split)' if k.startswith('test_') else ''} {v * (100 if pct else 1):.2f}"
                        for k, v in baselines.items())
  lines = [f"# Ablation sweep `{sweep.name}`{' (--quick)' if quick else ''}", "",
           f"Command: `python -m experiments.ablate --sweep {sweep.name} --out DIR{' --quick' if quick else ''}"
           + "".join(f" --total_steps {v}" if k == "total_steps" else f" --set {k}={json.dumps(v)}"
                     for k, v in (extra or {}).items()) + "`; "
           f"base config `configs/{module}.py{':' + arg if arg else ''}`"
           f" + `{json.dumps(sweep.base_for(quick))}`.", "",
           f"Machine: {machine['cpu']}, {machine['cores']} cores, backend {machine['backend']}, jax {machine['jax']}.",
           "", f"**Paper claim.** {sweep.claim}", "", f"**Shrunk.** {sweep.shrunk}", "",
           *_overridden_note(sweep, rows, extra, quick),
           f"Headline metric: final `{sweep.metric}` (mean ± population std over seeds when there are several)"
           + (f"; baselines (validation split unless marked): {base_text}" if base_text else "")
           + (f"; the ÷ {sweep.reference} column divides `{sweep.ratio_metric}`"
              if sweep.reference and sweep.ratio_metric != sweep.metric else "") + ".",
           "", markdown_table(table, list(table[0])) if table else "(no runs)", ""]
  bad = [r for r in rows if r["status"] != "ok"]
  if bad:
    lines += ["Runs stopped by a non-finite loss:", ""]
    lines += [f"- `{r['arm']}` seed {r['seed']}: {r['error']}" for r in bad] + [""]
  lines += [f"Per-run rows, eval curves and the final metrics of every run: `{sweep.name}.json`; curves: "
            f"`{sweep.name}.png`.", ""]
  path.write_text("\n".join(lines))


def write_plot(sweep: Sweep, rows: list, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm in dict.fromkeys(r["arm"] for r in rows):
    for ax, key in zip(axes, ("eval_curve", "train_loss_curve")):
      curves = [{s: y for s, y in r[key] if y is not None} for r in rows if r["arm"] == arm and r[key]]
      if not curves:
        continue
      steps = sorted(set.intersection(*[set(c) for c in curves]))
      if not steps:
        continue
      ys = np.array([[c[s] for s in steps] for c in curves])
      mean = ys.mean(0)
      line, = ax.plot(steps, mean, marker="o" if key == "eval_curve" else None, ms=3, label=arm)
      if len(curves) > 1:
        ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
  axes[0].set_title(f"{sweep.metric} (mean over seeds; band = min–max)")
  axes[1].set_title("train loss")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if sweep.metric == "eval_perplexity":
    axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  for ax in axes:
    for axis in (ax.yaxis,):
      axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      axis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=8)
  fig.suptitle(f"ablation sweep {sweep.name}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_sweep(name: str, out: str | os.PathLike, quick: bool = False, seeds: Optional[Sequence[int]] = None,
              arms: Optional[Sequence[str]] = None, extra: Optional[dict] = None, log=print) -> dict:
  """Runs (or skips, when finished) every run of sweep ``name`` and writes DIR/NAME.{json,md,png}.
  Returns {"rows", "summary", "paths"}."""
  from experiments.bench_common import machine_info
  if name not in SWEEPS:
    raise ValueError(f"unknown sweep {name!r}; allowed: {', '.join(SWEEPS)}.")
  sweep = SWEEPS[name]
  arm_list = sweep.arms_for(quick)
  if arms:
    unknown = set(arms) - {a for a, _ in arm_list}
    if unknown:
      raise ValueError(f"unknown arm(s) {sorted(unknown)} of sweep {name!r}; allowed: {[a for a, _ in arm_list]}.")
    arm_list = tuple((a, o) for a, o in arm_list if a in arms)
  seed_list = tuple(seeds) if seeds else sweep.seeds_for(quick)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = [run_one(sweep, arm, overrides, seed, out, quick, extra, log)
          for arm, overrides in arm_list for seed in seed_list]
  summary = summarize(sweep, rows)
  machine = machine_info()
  paths = {ext: out / f"{name}.{ext}" for ext in ("json", "md", "png")}
  doc = {"sweep": name, "quick": quick, "metric": sweep.metric, "claim": sweep.claim, "shrunk": sweep.shrunk,
         "base_config": sweep.config, "base_overrides": sweep.base_for(quick),
         "extra_overrides": extra or {}, "seeds": list(seed_list), "machine": machine, "summary": summary,
         "rows": [{k: v for k, v in r.items() if k != "skipped"} for r in rows]}
  paths["json"].write_text(json.dumps(_plain(doc), indent=1, allow_nan=False))
  write_markdown(sweep, rows, summary, paths["md"], quick, machine, extra)
  write_plot(sweep, rows, paths["png"])
  log(" ".join(str(p) for p in paths.values()))
  return {"rows": rows, "summary": summary, "paths": paths}


def _plain(v):
  """JSON-safe copy: numpy scalars → Python numbers, non-finite floats → None (strict JSON has no NaN)."""
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


class SweepStopped(Exception):
  """A run was stopped by SIGTERM/SIGINT: no marker, no outputs; rerunning the command continues it."""


_BASELINE_NAMES = {"baseline_unigram_perplexity": "unigram perplexity",
                   "baseline_majority_accuracy": "majority class",
                   "baseline_outer_operator_accuracy": "outermost-operator lookup table"}


def _overridden_note(sweep: Sweep, rows, extra, quick: bool) -> list:
  """A line saying where this run departs from the sweep's own settings (the "Shrunk" text describes those)."""
  seeds = sorted({r["seed"] for r in rows})
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  own_arms = [a for a, _ in sweep.arms_for(quick)]
  parts = [f"{k}={json.dumps(v)}" for k, v in (extra or {}).items()]
  if not quick and seeds != sorted(sweep.seeds):
    parts.append(f"seeds {', '.join(map(str, seeds))}")
  if arms != own_arms:
    parts.append(f"arms {', '.join(arms)} only")
  return [f"**This run differs from that:** {'; '.join(parts)}.", ""] if parts else []


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="the sweep to run")
  parser.add_argument("--out", help="output directory (run workdirs go to OUT/SWEEP/<arm>_seed<s>)")
  parser.add_argument("--quick", action="store_true", help="1–2 tiny arms, one seed, a few steps (tests)")
  parser.add_argument("--seeds", help="comma-separated seeds instead of the sweep's own set")
  parser.add_argument("--arms", help="comma-separated subset of the sweep's arms")
  parser.add_argument("--total_steps", type=int, help="train every run this many steps; finished shorter runs "
                      "are continued from their final checkpoint (not with a cosine schedule)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="extra dotted config override for every run (JSON value), e.g. data.path=DIR")
  parser.add_argument("--list", action="store_true", help="list the sweeps and their arms")
  args = parser.parse_args(argv)
  if args.list:
    for s in SWEEPS.values():
      print(f"{s.name}: {', '.join(a for a, _ in s.arms)} × seeds {list(s.seeds)}")
    return {}
  if not args.sweep or not args.out:
    parser.error("--sweep and --out are required")
  extra = dict(item.split("=", 1) for item in args.set)
  extra = {k: _parse_value(v) for k, v in extra.items()}
  if args.total_steps:
    extra["total_steps"] = args.total_steps
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
  arms = args.arms.split(",") if args.arms else None
  try:
    return run_sweep(args.sweep, args.out, args.quick, seeds, arms, extra,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
  except SweepStopped as e:  # a requested stop, not an error: exit 0 like experiments.train
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(0) from None


if __name__ == "__main__":
  main()
