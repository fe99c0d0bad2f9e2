"""Loads a linformer-pytorch (tatp22, PyPI 0.19.3) ``Linformer`` state_dict into ``models.Linformer``.

Pure numpy + JAX: torch is never imported. Produce the input once in a PyTorch environment with
``{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}``.

Layout of the PyTorch state_dict (post-LN; per layer i, ``a = 2i`` and ``f = 2i + 1``, or ``a = i`` when
``include_ff=False``)::

    seq.{a}.fn.to_{q,k,v}.{h}.weight   (d_h, channels)        per-head Q/K/V maps, no bias
    seq.{a}.fn.w_o.{weight,bias}        (channels, h·d_h), (channels,)
      or w_o_1 (w, h·d_h), (w,) and w_o_2 (channels, w), (channels,)   with w_o_intermediate_dim = w
    seq.{a}.fn.heads.{h}.{E,F}.{weight,bias}
        learnable: nn.Linear(n, k_i): (k_i, n), (k_i,)
        convolution: nn.Conv1d(d_h, d_h, s), s = n // k_i: (d_h, d_h, s), (d_h,)
    seq.{a}.norm.{weight,bias}          (channels,)
    seq.{f}.fn.w_1.{weight,bias}        (dim_ff, channels), (dim_ff,)
    seq.{f}.fn.w_2.{weight,bias}        (channels, dim_ff), (channels,)
    seq.{f}.norm.{weight,bias}          (channels,)

A module shared in PyTorch is listed under every path that reaches it: with ``parameter_sharing="headwise"``
``heads.{h}.E`` is the same tensor for all heads h of a layer, with ``"kv"`` also ``F`` = ``E``, with
``"layerwise"`` one E = F for all heads of all layers. The converter reads the first occurrence and checks
that every other one is present and equal.

Mapping to the Flax tree (``W`` = PyTorch weight)::

    to_q.{h}.weight        → layer_i/attention/query/kernel[:, h, :] = Wᵀ        (channels, h, d_h)
    w_o.weight             → layer_i/attention/out/kernel = Wᵀ.reshape(h, d_h, channels)
    w_o_1 / w_o_2          → layer_i/attention/out_1 (kernel (h, d_h, w)) / out_2 (kernel (w, channels))
    E/F learnable          → kernel = Wᵀ (n, k_i) [per head: (h, n, k_i)], bias (k_i,) [(h, k_i)]
    E/F convolution        → conv_kernel = W.transpose(2, 1, 0) (s, d_h, d_h) [(h, s, d_h, d_h)],
                             bias (d_h,) [(h, d_h)]
      sharing none → layer_i/attention/{E,F} per head; headwise → layer_i/attention/{E,F};
      kv → layer_i/attention/EF; layerwise → EF at the top of the tree
    norm                   → layer_i/ln_attention, layer_i/ln_ff {scale, bias}
    w_1 / w_2              → layer_i/ff/wi, layer_i/ff/wo {kernel = Wᵀ, bias}
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from linformer_jax.models.linformer import Linformer

__all__ = ["from_linformer_pytorch"]

_METHODS = {"learnable": "learnable", "convolution": "conv"}


@dataclasses.dataclass
class _Entry:
  """One leaf of the Flax tree (or a PyTorch tensor that is read, checked and dropped).

  path: Flax param path, or None for tensors the converted model does not use (E/F with full_attention).
  parts: one alias list per PyTorch tensor combined into the leaf; the first alias is read, the others
    are the same shared module under other paths and must be equal to it.
  torch_shape: expected shape of every part.
  combine: list of part arrays → the Flax array.
  """
  path: Optional[tuple]
  parts: list
  torch_shape: tuple
  combine: Callable[[list], np.ndarray]


def _single(fn=lambda a: a):
  return lambda arrays: fn(arrays[0])


def _stack(fn=lambda a: a, axis=0):
  return lambda arrays: np.stack([fn(a) for a in arrays], axis=axis)


def _check_option(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not a valid linformer-pytorch option; allowed: "
                     f"{', '.join(repr(a) for a in allowed)}.")


def _reject_unsupported(decoder_mode, causal, ff_intermediate, method):
  if decoder_mode:
    raise ValueError(
        "decoder_mode=True is not supported: linformer-pytorch's decoder layers are [Linformer "
        "self-attention, FF, cross-attention with its n×k 'causal' mask, FF], which leaks future tokens "
        "through E; linformer_jax.models.LinformerEncDec uses exactly causal full self-attention instead, "
        "so there is no equivalent model to convert to.")
  if causal:
    raise ValueError(
        "causal=True is not supported: linformer-pytorch's n×k causal mask does not make a Linformer "
        "causal (E mixes all n positions into every projected key), and linformer_jax.models.Linformer "
        "refuses causal Linformer attention for that reason; there is no equivalent model.")
  if ff_intermediate is not None:
    raise ValueError(
        f"ff_intermediate={ff_intermediate!r} is not supported: it changes the width between layers "
        "(with a Linear 'resample' on the residual), while linformer_jax.models.Linformer keeps the width "
        "constant.")
  if method == "no_params":
    raise ValueError(
        "method='no_params' is not supported: linformer-pytorch keeps its fixed random E as a plain "
        "tensor attribute, which is not saved in state_dict (and is redrawn at every construction), so "
        "the matrix the PyTorch model used cannot be recovered from a state_dict.")


def _layer_k(dim_k, k_reduce_by_layer, depth, parameter_sharing):
  """k_i of each layer as the PyTorch model builds it (layerwise reuses layer 0's E everywhere)."""
  if parameter_sharing == "layerwise":
    return [dim_k] * depth
  return [max(1, dim_k - i * k_reduce_by_layer) for i in range(depth)]


def _plan(*, input_size, channels, head_dim, nhead, depth, dim_ff, layer_k, parameter_sharing,
          method, full_attention, include_ff, w_o_intermediate_dim) -> list:
  """All _Entry of the conversion, in PyTorch order."""
  c, d, h, n = channels, head_dim, nhead, input_size
  entries = []

  def add(path, parts, torch_shape, combine):
    entries.append(_Entry(path, parts, tuple(torch_shape), combine))

  def linear(path, key, out_features, in_features):
    """nn.Linear(in, out) → Dense kernel Wᵀ (in, out) and bias (out,)."""
    add(path + ("kernel",), [[key + ".weight"]], (out_features, in_features), _single(np.transpose))
    add(path + ("bias",), [[key + ".bias"]], (out_features,), _single())

  def projection(path, aliases_per_part, k_i, per_head):
    """E/F: aliases_per_part(param_name) → list of alias lists (one per head if per_head)."""
    if method == "learnable":
      w_shape, b_shape, w_name = (k_i, n), (k_i,), "kernel"
      w_fn = np.transpose
    else:
      w_shape, b_shape, w_name = (d, d, int(n / k_i)), (d,), "conv_kernel"
      w_fn = lambda w: np.transpose(w, (2, 1, 0))
    combine_w = _stack(w_fn) if per_head else _single(w_fn)
    combine_b = _stack() if per_head else _single()
    add(None if path is None else path + (w_name,), aliases_per_part("weight"), w_shape, combine_w)
    add(None if path is None else path + ("bias",), aliases_per_part("bias"), b_shape, combine_b)

  for i, k_i in enumerate(layer_k):
    a = 2 * i if include_ff else i
    pre = f"seq.{a}.fn."
    attn = (f"layer_{i}", "attention")
    for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
      add(attn + (ours, "kernel"), [[f"{pre}{theirs}.{j}.weight"] for j in range(h)], (d, c),
          _stack(np.transpose, axis=1))
    if w_o_intermediate_dim is None:
      add(attn + ("out", "kernel"), [[pre + "w_o.weight"]], (c, h * d),
          _single(lambda w: w.T.reshape(h, d, c)))
      add(attn + ("out", "bias"), [[pre + "w_o.bias"]], (c,), _single())
    else:
      w = w_o_intermediate_dim
      add(attn + ("out_1", "kernel"), [[pre + "w_o_1.weight"]], (w, h * d),
          _single(lambda m: m.T.reshape(h, d, w)))
      add(attn + ("out_1", "bias"), [[pre + "w_o_1.bias"]], (w,), _single())
      linear(attn + ("out_2",), pre + "w_o_2", c, w)

    head_key = lambda j, which, p: f"{pre}heads.{j}.{which}.{p}"
    if parameter_sharing == "none":
      for which in ("E", "F"):
        projection(None if full_attention else attn + (which,),
                   lambda p, which=which: [[head_key(j, which, p)] for j in range(h)], k_i, True)
    elif parameter_sharing == "headwise":
      for which in ("E", "F"):
        projection(None if full_attention else attn + (which,),
                   lambda p, which=which: [[head_key(j, which, p) for j in range(h)]], k_i, False)
    elif parameter_sharing == "kv":
      projection(None if full_attention else attn + ("EF",),
                 lambda p: [[head_key(j, which, p) for j in range(h) for which in ("E", "F")]],
                 k_i, False)
    add((f"layer_{i}", "ln_attention", "scale"), [[f"seq.{a}.norm.weight"]], (c,), _single())
    add((f"layer_{i}", "ln_attention", "bias"), [[f"seq.{a}.norm.bias"]], (c,), _single())

    if include_ff:
      f = a + 1
      linear((f"layer_{i}", "ff", "wi"), f"seq.{f}.fn.w_1", dim_ff, c)
      linear((f"layer_{i}", "ff", "wo"), f"seq.{f}.fn.w_2", c, dim_ff)
      add((f"layer_{i}", "ln_ff", "scale"), [[f"seq.{f}.norm.weight"]], (c,), _single())
      add((f"layer_{i}", "ln_ff", "bias"), [[f"seq.{f}.norm.bias"]], (c,), _single())

  if parameter_sharing == "layerwise":
    # One module for E and F of every head of every layer; listed under each of those paths.
    def every_path(p):
      return [[f"seq.{2 * i if include_ff else i}.fn.heads.{j}.{which}.{p}"
               for i in range(depth) for j in range(h) for which in ("E", "F")]]
    projection(None if full_attention else ("EF",), every_path, layer_k[0], False)
  return entries


def _read(state_dict, entries, expected, sharing):
  """Reads, checks and transforms every entry. Returns (flat params, list of problems)."""
  problems, params, used = [], {}, set()

  def get(key, shape):
    used.add(key)
    if key not in state_dict:
      problems.append(f"missing key {key!r} (expected shape {shape})")
      return None
    value = np.asarray(state_dict[key])
    if value.shape != shape:
      problems.append(f"key {key!r} has shape {value.shape}, expected {shape}")
      return None
    return value

  for entry in entries:
    arrays = []
    for aliases in entry.parts:
      first = get(aliases[0], entry.torch_shape)
      for alias in aliases[1:]:
        dup = get(alias, entry.torch_shape)
        if first is not None and dup is not None and not np.array_equal(first, dup, equal_nan=True):
          problems.append(
              f"key {alias!r} differs from {aliases[0]!r}; with parameter_sharing={sharing!r} "
              "linformer-pytorch stores one shared module under both names, so they must be equal")
      arrays.append(first)
    if entry.path is None or any(a is None for a in arrays):
      continue
    spec = expected.get(entry.path)
    value = entry.combine(arrays)
    if spec is None or value.shape != tuple(spec.shape):
      raise RuntimeError(f"internal error: converted {'/'.join(entry.path)} to shape {value.shape}, "
                         f"model expects {None if spec is None else spec.shape}")
    params[entry.path] = jnp.asarray(value, dtype=spec.dtype)

  leftover = sorted(set(state_dict) - used)
  if leftover:
    problems.append(f"unused keys (not part of a linformer-pytorch Linformer with these options): "
                    f"{', '.join(repr(k) for k in leftover)}")
  if not problems:
    unset = set(expected) - set(params)
    if unset:
      raise RuntimeError("internal error: no PyTorch tensor maps to "
                         + ", ".join("/".join(p) for p in sorted(unset)))
  return params, problems


def from_linformer_pytorch(state_dict: Mapping[str, Any], *, input_size: int, channels: int, dim_k: int,
                           dim_ff: int = 256, dim_d: Optional[int] = None, dropout_ff: float = 0.15,
                           nhead: int = 4, depth: int = 1, dropout: float = 0.1, activation: str = "gelu",
                           checkpoint_level: str = "C0", parameter_sharing: str = "layerwise",
                           k_reduce_by_layer: int = 0, full_attention: bool = False, include_ff: bool = True,
                           w_o_intermediate_dim: Optional[int] = None, decoder_mode: bool = False,
                           causal: bool = False, method: str = "learnable",
                           ff_intermediate: Optional[int] = None):
  """Converts a ``linformer_pytorch.Linformer(**kwargs).state_dict()`` to a Flax ``Linformer``.

  Args:
    state_dict: name → numpy array, exactly the keys of the PyTorch model's ``state_dict()`` (shared
      modules listed under every path, as PyTorch does).
    input_size, channels, dim_k, ...: the PyTorch constructor's keyword arguments, with its defaults.
      ``dropout`` becomes the attention-weight dropout and ``dropout_ff`` the model's ``dropout`` (sub-layer
      outputs and inside the feed-forward; PyTorch uses ``dropout`` on the attention output instead — only
      training differs, and only when the two rates differ). ``checkpoint_level`` is accepted and ignored
      (the result uses no rematerialisation; outputs are the same).
      Not supported (ValueError): ``decoder_mode``, ``causal``, ``ff_intermediate``, ``method="no_params"``.

  Returns:
    ``(module, variables)``: a ``linformer_jax.models.Linformer`` (``norm="post"``, ``projection_bias=True``)
    and ``{"params": ...}`` such that ``module.apply(variables, x, mask=mask)`` with x (batch, input_size,
    channels) and mask (batch, input_size) bool equals the PyTorch eval-mode ``model(x, input_mask=mask)``.
    Exception: with ``full_attention=True`` *and* a mask, PyTorch zeroes padded K/V rows but keeps them in
    the softmax, while the converted model masks them out of the softmax (intentional).

  Raises:
    TypeError: unknown keyword argument.
    ValueError: an unsupported or invalid option; ``method="convolution"`` with a k_i that does not divide
      ``input_size`` (PyTorch then yields a different number of slots than k); missing tensors, wrong
      shapes, unequal copies of a shared module, or keys the model does not use (all listed by name).

  With ``parameter_sharing="layerwise"`` the PyTorch model ignores ``k_reduce_by_layer`` (every layer reuses
  the single E of width dim_k); the converter warns and converts with ``k_reduce_by_layer=0``.

  Examples:
    A state_dict with the keys of ``Linformer(input_size=16, channels=8, dim_k=4, nhead=1, depth=1,
    include_ff=False)`` (default ``parameter_sharing="layerwise"``: E and F are one shared module), here
    random numpy arrays instead of a trained model's:

    >>> import numpy as np
    >>> from linformer_jax.convert import from_linformer_pytorch
    >>> rng = np.random.default_rng(0)
    >>> w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    >>> sd = {f"seq.0.fn.{m}.0.weight": w(8, 8) for m in ("to_q", "to_k", "to_v")}
    >>> sd |= {"seq.0.fn.w_o.weight": w(8, 8), "seq.0.fn.w_o.bias": w(8),
    ...        "seq.0.norm.weight": w(8), "seq.0.norm.bias": w(8)}
    >>> shared = {"weight": w(4, 16), "bias": w(4)}
    >>> sd |= {f"seq.0.fn.heads.0.{m}.{p}": a for m in "EF" for p, a in shared.items()}
    >>> module, variables = from_linformer_pytorch(sd, input_size=16, channels=8, dim_k=4, nhead=1,
    ...                                            include_ff=False)
    >>> variables["params"]["EF"]["kernel"].shape  # Wᵀ of the shared nn.Linear(16, 4)
    (16, 4)
    >>> module.apply(variables, np.ones((2, 16, 8), np.float32)).shape
    (2, 16, 8)
  """
  _reject_unsupported(decoder_mode, causal, ff_intermediate, method)
  _check_option("activation", activation, ("gelu", "relu"))
  _check_option("checkpoint_level", checkpoint_level, ("C0", "C1", "C2"))
  _check_option("parameter_sharing", parameter_sharing, ("none", "headwise", "kv", "layerwise"))
  _check_option("method", method, tuple(_METHODS))
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}.")
  if parameter_sharing == "layerwise" and k_reduce_by_layer:
    warnings.warn(
        f"k_reduce_by_layer={k_reduce_by_layer} has no effect in linformer-pytorch with "
        "parameter_sharing='layerwise' (every layer reuses the one E of width dim_k); converting with "
        "k_reduce_by_layer=0, which is what the PyTorch model computes.", UserWarning, stacklevel=2)
    k_reduce_by_layer = 0

  module = Linformer(
      max_len=input_size, dim=channels, depth=depth, num_heads=nhead, k=dim_k, dim_ff=dim_ff, head_dim=dim_d,
      sharing=parameter_sharing, projection=_METHODS[method], projection_bias=True,
      k_reduce_by_layer=k_reduce_by_layer, attention="full" if full_attention else "linformer", norm="post",
      activation=activation, include_ff=include_ff, w_o_intermediate_dim=w_o_intermediate_dim,
      dropout=dropout_ff, attention_dropout=dropout, layer_norm_eps=1e-5)
  layer_k = _layer_k(dim_k, k_reduce_by_layer, depth, parameter_sharing)
  if method == "convolution" and not full_attention:
    for i, k_i in enumerate(layer_k):
      if input_size % k_i:
        raise ValueError(
            f"method='convolution' needs k to divide input_size, but layer {i} has k={k_i} and "
            f"input_size={input_size}: linformer-pytorch's Conv1d (kernel = stride = int(n/k) = "
            f"{input_size // k_i}) then yields {input_size // (input_size // k_i)} positions instead of "
            f"k={k_i}, which the converted model (exactly k windows of ceil(n/k)) does not reproduce.")

  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, input_size, channels), jnp.float32))
  expected = traverse_util.flatten_dict(expected["params"])
  head_dim = dim_d if dim_d is not None else channels // nhead
  entries = _plan(input_size=input_size, channels=channels, head_dim=head_dim, nhead=nhead, depth=depth,
                  dim_ff=dim_ff, layer_k=layer_k, parameter_sharing=parameter_sharing, method=method,
                  full_attention=full_attention, include_ff=include_ff,
                  w_o_intermediate_dim=w_o_intermediate_dim)
  params, problems = _read(state_dict, entries, expected, parameter_sharing)
  if problems:
    raise ValueError("state_dict does not match linformer_pytorch.Linformer with the given options:\n  "
                     + "\n  ".join(problems))
  return module, {"params": traverse_util.unflatten_dict(params)}
