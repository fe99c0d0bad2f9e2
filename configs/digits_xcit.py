"""A small XCiT on scikit-learn's digits (resized to 32×32), or CIFAR-10 with data.name=cifar10 and a path.

ARGS: runlocal | model=<registry name> (default xcit_nano_12_p8_224 shrunk to depth 4)"""
from configs.common import base_config, parse_arg, runlocal


def get_config(arg=None):
  a = parse_arg(arg, runlocal=False, model="xcit_nano_12_p8_224", depth=4)
  c = base_config("digits")
  c.data.image_size = 32
  c.total_steps = 1500
  c.batch_size = 64
  c.log_every, c.eval_every, c.checkpoint_every = 50, 250, 500
  c.model = dict(name=a.model, depth=a.depth, drop_path_rate=0.05, img_size=32)
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "cosine"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  if a.runlocal:
    runlocal(c)
    c.data.image_size = 16
    c.model.update(depth=1, embed_dim=32, num_heads=2, img_size=16, cls_attn_layers=1)
    c.optimizer.warmup_steps = 2
  return c
