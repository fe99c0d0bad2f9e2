"""LRA ListOps shared by listops_linformer.py and listops_transformer.py (Tay et al. 2020, LRA configs:
4 layers, 8 heads, emb 512, mlp 1024, batch 32, 5k steps, lr 0.05 · linear warmup 1000 · rsqrt decay,
Adam(0.9, 0.98, wd 0.1), CLS pooling, dropout 0.1, k = 16 for Linformer)."""
from configs.common import base_config, parse_arg, runlocal


def listops_config(arg, attention: str):
  a = parse_arg(arg, runlocal=False, cpu=False, k=16, sharing="kv")
  c = base_config("listops")
  c.total_steps = 5000
  c.batch_size = 32
  c.log_every, c.eval_every, c.checkpoint_every = 50, 500, 1000
  c.model = dict(name="linformer_classifier", dim=512, depth=4, num_heads=8, k=a.k, dim_ff=1024,
                 attention=attention, sharing=a.sharing, pool="cls", mlp_dim=1024, dropout=0.1,
                 attention_dropout=0.1, norm="pre", pos_emb="sinusoidal")
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "rsqrt"
  c.optimizer.learning_rate = 0.05 / 1000 ** 0.5  # LRA's 0.05 with warmup 1000 peaks at 1.58e-3
  c.optimizer.warmup_steps = 1000
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.weight_decay = 0.1
  if a.cpu:  # CPU-sized: shorter sequences, smaller model, fewer examples
    c.data.update(num_train=4000, num_eval=500, min_length=50, max_length=300, max_len=300)
    c.model.update(dim=128, depth=2, num_heads=4, dim_ff=256, mlp_dim=256)
    c.total_steps, c.eval_every, c.checkpoint_every = 2000, 250, 500
    c.optimizer.warmup_steps = 200
  if a.runlocal:
    runlocal(c)
    c.data.update(num_train=64, num_eval=16, num_test=16, min_length=10, max_length=60, max_len=64)
    c.model.update(dim=32, depth=2, num_heads=2, k=8, dim_ff=64, mlp_dim=32)
    c.optimizer.warmup_steps = 2
  return c
