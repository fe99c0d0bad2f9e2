"""LRA ListOps with the full-attention Transformer baseline (same block, attention="full").

ARGS: runlocal | cpu"""
from configs.listops import listops_config


def get_config(arg=None):
  return listops_config(arg, attention="full")
