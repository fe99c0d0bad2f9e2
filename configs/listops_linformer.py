"""LRA ListOps with a Linformer (k=16, one projection per layer shared by K, V and heads, as LRA's Flax code).

ARGS: runlocal | cpu | k=… | sharing=…"""
from configs.listops import listops_config


def get_config(arg=None):
  return listops_config(arg, attention="linformer")
