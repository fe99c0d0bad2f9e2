"""Optimizer-state bytes: Adafactor vs Adam for a Linformer-base-like masked LM (shapes only, nothing executed).

    python -m experiments.bench_optimizer --out DIR [--quick]

Model (full run): ``LinformerLM`` with the RoBERTa-base geometry of the paper's Table 2 (vocab 50,265,
max_len 512, dim 768, 12 layers, 12 heads, FF 3072, k 128), sharing "none" (288 E/F matrices) and "layerwise"
(one). ``--quick`` is the same (it takes seconds); the hidden test mode uses a small model.
Optimizers: ``linformer_jax.optim.make_optimizer`` Adafactor (default config: factored, min_dim_size_to_factor
32, no momentum) and AdamW, plus ``optax.adam`` / ``optax.adafactor`` (defaults, min_dim_size_to_factor 128) and
Adafactor with momentum 0.9 for reference. State bytes = Σ size·itemsize over ``jax.eval_shape(tx.init,
params)``. ``expected_bytes`` is an independent count from the parameter shapes alone (Adam: 2 floats per
parameter; Adafactor: for a tensor whose second-largest axis is >= min_dim_size_to_factor, one float per row
and per column of its two largest axes (other axes batch axes), else one per element; + momentum).
Rows: model, optimizer, params, param_bytes, state_bytes, expected_bytes, state_vs_params, adam_over_this.
Writes DIR/optimizer.{json,md,png}.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_common import bench_parser, finish, write_plot
from linformer_jax.models import LinformerLM
from linformer_jax.optim import default_optimizer_config, make_optimizer

COLUMNS = ["model", "optimizer", "params", "param_bytes", "state_bytes", "expected_bytes", "state_vs_params",
           "adam_over_this"]

GEOMETRY = {
    "full": dict(vocab_size=50265, max_len=512, dim=768, depth=12, num_heads=12, dim_ff=3072, k=128),
    "tiny": dict(vocab_size=1000, max_len=128, dim=64, depth=2, num_heads=4, dim_ff=256, k=32),
}


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def adafactor_floats(shape, min_dim_size_to_factor: int) -> int:
  """Second-moment floats of one tensor under Adafactor's rule (optax): factor the two largest axes when the
  second-largest is >= min_dim_size_to_factor (rows + columns, other axes batch axes), else keep every element."""
  size = math.prod(shape)
  if len(shape) >= 2:
    largest, second = sorted(shape)[-1], sorted(shape)[-2]
    if second >= min_dim_size_to_factor:
      return size // largest + size // second
  return size


def expected_state_bytes(params, optimizer: str, min_dim: int = 32, momentum: bool = False) -> int:
  """Independent count of the optimizer-state bytes (float32) from the parameter shapes alone; excludes the
  few scalar counters and placeholder entries the implementations keep."""
  shapes = [x.shape for x in jax.tree.leaves(params)]
  if optimizer == "adam":
    return 4 * 2 * sum(math.prod(s) for s in shapes)
  floats = sum(adafactor_floats(s, min_dim) for s in shapes)
  if momentum:
    floats += sum(math.prod(s) for s in shapes)
  return 4 * floats


def optimizers():
  """(name, transformation, kind for expected_state_bytes, kwargs)."""
  ours = default_optimizer_config()
  adamw = default_optimizer_config()
  adamw.update(name="adamw", schedule="constant", learning_rate=1e-3)
  momentum = default_optimizer_config()
  momentum.momentum = 0.9
  return [
      ("adamw (ours)", make_optimizer(adamw, 1000).tx, "adam", {}),
      ("optax.adam", optax.adam(1e-3), "adam", {}),
      ("adafactor (ours)", make_optimizer(ours, 1000).tx, "adafactor", dict(min_dim=32)),
      ("optax.adafactor (min_dim 128)", optax.adafactor(1e-3), "adafactor", dict(min_dim=128)),
      ("adafactor + momentum 0.9 (ours)", make_optimizer(momentum, 1000).tx, "adafactor",
       dict(min_dim=32, momentum=True)),
  ]


def run(mode: str):
  geometry = GEOMETRY["tiny" if mode == "tiny" else "full"]
  rows = []
  for sharing in ("none", "layerwise"):
    model = LinformerLM(**geometry, sharing=sharing)
    tokens = jax.ShapeDtypeStruct((1, geometry["max_len"]), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    name = (f"LinformerLM dim {geometry['dim']} × {geometry['depth']} layers, k {geometry['k']}, "
            f"sharing {sharing}")
    adam_bytes = None
    for opt_name, tx, kind, kw in optimizers():
      state_bytes = tree_bytes(jax.eval_shape(tx.init, params))
      adam_bytes = adam_bytes or state_bytes
      rows.append(dict(model=name, sharing=sharing, optimizer=opt_name, params=n_params,
                       param_bytes=tree_bytes(params), state_bytes=state_bytes,
                       expected_bytes=expected_state_bytes(params, kind, **kw),
                       state_vs_params=round(state_bytes / tree_bytes(params), 4),
                       adam_over_this=round(adam_bytes / state_bytes, 1)))
      r = rows[-1]
      print(f"{sharing:>9} {opt_name:<32} state {r['state_bytes'] / 2**20:10.3f} MiB "
            f"(expected {r['expected_bytes'] / 2**20:10.3f})  Adam/this {r['adam_over_this']:>7}×", flush=True)
  return rows


def plot(rows, path):
  def draw(axes):
    for ax, sharing in zip(axes, ("none", "layerwise")):
      sel = [r for r in rows if r["sharing"] == sharing]
      ax.barh([r["optimizer"] for r in sel], [r["state_bytes"] / 2**20 for r in sel])
      ax.set(xscale="log", xlabel="optimizer state (MiB, log)", title=f"sharing {sharing}")
      for i, r in enumerate(sel):
        ax.text(r["state_bytes"] / 2**20, i, f" {r['state_bytes'] / 2**20:.2f}", va="center", fontsize=7)
  write_plot(path, draw, figsize=(12, 3.5))


def main(argv=None):
  p = bench_parser(__doc__, quick_help="same as the full run (shapes only, seconds)")
  args = p.parse_args(argv)
  rows = run("tiny" if args.tiny else "full")
  return finish(args, "optimizer", rows, COLUMNS, "Optimizer state: Adafactor vs Adam",
                "state_bytes from jax.eval_shape(tx.init, params); expected_bytes = independent count "
                "from parameter shapes (float32, without scalar counters/placeholders); "
                "adam_over_this = AdamW (ours) state / this state.", plot)


if __name__ == "__main__":
  main()
