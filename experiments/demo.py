"""Demo: build a Linformer encoder and a Linformer masked LM, run them on random input and print shapes,
parameter counts and the number of E/F projection matrices per sharing mode.

    python -m experiments.demo [--max_len 512 --dim 128 --depth 4 --heads 4 --k 64]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from linformer_jax.models import Linformer, LinformerLM, count_projection_matrices

SHARING_MODES = ("none", "headwise", "kv", "layerwise")


def param_count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--max_len", type=int, default=512)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--vocab", type=int, default=256)
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
  cfg = dict(max_len=args.max_len, dim=args.dim, depth=args.depth, num_heads=args.heads, k=args.k)
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (args.batch, args.max_len, args.dim))
  # the second sequence is shorter: its padding is masked out
  mask = jnp.arange(args.max_len)[None, :] < jnp.array([[args.max_len], [args.max_len // 2]])[: args.batch]

  print(f"\nLinformer encoder {cfg}")
  print(f"{'sharing':>10} {'E/F matrices':>13} {'params':>12} {'output':>16} {'fwd ms':>8}")
  for sharing in SHARING_MODES:
    model = Linformer(**cfg, sharing=sharing)
    variables = jax.jit(model.init)(rng, x)
    fwd = jax.jit(model.apply)
    y = fwd(variables, x, mask).block_until_ready()
    t0 = time.perf_counter()
    fwd(variables, x, mask).block_until_ready()
    ms = 1e3 * (time.perf_counter() - t0)
    print(f"{sharing:>10} {count_projection_matrices(variables):>13} {param_count(variables):>12,} "
          f"{str(y.shape):>16} {ms:>8.1f}")
  paper = Linformer(max_len=512, dim=768, depth=12, num_heads=12, k=128)
  counts = {s: count_projection_matrices(jax.eval_shape(
      paper.clone(sharing=s).init, rng, jax.ShapeDtypeStruct((1, 512, 768), jnp.float32)))
      for s in SHARING_MODES}
  print(f"12 layers x 12 heads (paper Sec. 4: 288/24/12/1): {counts}")

  lm = LinformerLM(vocab_size=args.vocab, **cfg, sharing="kv")
  tokens = jax.random.randint(rng, (args.batch, args.max_len), 0, args.vocab)
  variables = jax.jit(lm.init)(rng, tokens)
  logits = jax.jit(lm.apply)(variables, tokens, mask)
  print(f"\nLinformerLM (vocab {args.vocab}, sharing kv): tokens {tokens.shape} -> logits {logits.shape}, "
        f"{param_count(variables):,} params, {count_projection_matrices(variables)} E/F matrices")
  print(f"logits finite: {bool(jnp.isfinite(logits).all())}")


if __name__ == "__main__":
  main()
