"""Linformer models (Wang et al. 2020, arXiv 2006.04768): encoder, masked LM, classifier, encoder–decoder.

Parameter tree of ``Linformer`` (names are stable; converters and checkpoints rely on them)::

    EF                      network-wide projection (sharing="layerwise" only)
    layer_{i}/attention     query, key, value (kernel (dim, h, d_h)), out (kernel (h, d_h, dim), bias),
                            E, F (sharing none/headwise) or EF (kv): kernel (h?, max_len, k_i) [, bias]
    layer_{i}/ln_attention  LayerNorm of the attention sub-layer
    layer_{i}/ff            wi, wo (Dense)
    layer_{i}/ln_ff         LayerNorm of the feed-forward sub-layer
    ln_final                final LayerNorm (norm="pre" only)

The fixed random projection (projection="fixed") lives in the ``"constants"`` collection under the same path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import (as_dtype, check_bool, check_choice, check_int, check_length, check_mask,
                                     check_rate)
from linformer_jax.layers.attention import SHARING, FullSelfAttention, LinformerSelfAttention
from linformer_jax.layers.causal_linformer import CAUSAL_ERROR, CAUSAL_PROJECTIONS, DEFAULT_CHUNK
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.embeddings import POS_EMBS, TokenEmbedder
from linformer_jax.layers.mlp import ACTIVATIONS, FeedForward
from linformer_jax.layers.projections import CONSTANTS, PROJECTIONS, SeqProjection, check_projected_length
from linformer_jax.layers.softmax_kernel import check_kernel_args
from linformer_jax.remat import RematPlan, checkpoint_policy

#: Values of the ``attention`` field: Linformer attention, or ordinary full softmax attention.
ATTENTIONS = ("linformer", "full")
#: Values of the ``norm`` field: pre-LN (with a final LayerNorm) or post-LN.
NORMS = ("pre", "post")

class _Block(nn.Module):
  """One layer: attention sub-layer and (optionally) feed-forward sub-layer, pre- or post-LN.

  pre:  x ← x + Drop(Attn(LN(x)));  x ← x + Drop(FF(LN(x)))
  post: x ← LN(x + Drop(Attn(x)));  x ← LN(x + Drop(FF(x)))   (linformer-pytorch, RoBERTa)

  Attributes:
    config: the model's ``LinformerConfig``.
    k: this layer's projected length k_i (``config.k_per_layer()``).
    shared_projection: the network-wide E=F (sharing="layerwise").
    scanned: the block runs inside ``nn.scan``.
  """
  config: "LinformerConfig"
  k: int
  shared_projection: Optional[nn.Module] = None
  scanned: bool = False

  def _attention(self, parent, name: str, attention: str, causal: bool = False,
                 max_len: Optional[int] = None) -> nn.Module:
    """The attention layer of this block: the one place the config's fields reach the attention modules.

    ``max_len``: the positions a Linformer attention projects (default: the config's max_len; the decoder's
    self-attention: the target length).
    """
    c = self.config
    max_len = max_len or c.max_len
    common = dict(num_heads=c.num_heads, head_dim=c.head_dim, w_o_intermediate_dim=c.w_o_intermediate_dim,
                  attention_dropout=c.attention_dropout, remat_heads=c.remat_plan.per_head,
                  remat_policy=c.remat_policy, attention_impl=c.attention_impl,
                  attention_block_rows=c.attention_block_rows, dtype=c.dtype, param_dtype=c.param_dtype,
                  name=name, parent=parent)
    if attention == "linformer":
      return LinformerSelfAttention(max_len=max_len, k=self.k, sharing=c.sharing, projection=c.projection,
                                    projection_bias=c.projection_bias, shared_projection=self.shared_projection,
                                    causal=causal, causal_chunk=c.causal_chunk, decoding=c.decoding, **common)
    return FullSelfAttention(causal=causal, decoding=c.decoding, max_len=max_len if c.decoding else None, **common)

  def _feed_forward(self, parent):
    c = self.config
    return FeedForward(c.ff_dim, c.activation, c.dropout, remat_chunks=c.remat_plan.chunked_ff,
                       remat_policy=c.remat_policy, dtype=c.dtype, param_dtype=c.param_dtype, name="ff",
                       parent=parent)

  def _sublayer(self, x, fn, name, deterministic, *args):
    """The residual sub-layer around ``fn(block, h, *args)`` with its LayerNorm (pre or post).

    At C1 the whole sub-layer (LayerNorm, fn, dropout, residual) is one ``nn.remat`` region, so only its
    input is kept for the backward pass (at C2 the region is the whole layer, see ``RematPlan.layer``).
    Submodules are created inside with ``parent=block`` and explicit names, so the parameter tree is the
    same at every level.
    """
    c = self.config

    def body(block, x, *args):
      ln = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                        name=f"ln_{name}", parent=block)
      drop = lambda y: nn.Dropout(c.dropout, parent=block)(y, deterministic=deterministic)
      if c.norm == "pre":
        return x + drop(fn(block, ln(x), *args))
      return ln(x + drop(fn(block, x, *args)))

    return c.remat_plan.sublayer(body, scanned=self.scanned)(self, x, *args)

  def _feed_forward_sublayer(self, x, deterministic):
    if not self.config.include_ff:
      return x
    return self._sublayer(x, lambda block, h: self._feed_forward(block)(h, deterministic), "ff", deterministic)

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    c = self.config
    attend = lambda block, h, mask: self._attention(block, "attention", c.attention, c.causal)(
        h, None, mask, deterministic)
    x = self._sublayer(x, attend, "attention", deterministic, mask)
    return self._feed_forward_sublayer(x, deterministic)


def _create_shared_variables(shared: nn.Module, max_len: int, heads: int, head_dim: int) -> None:
  """At init, creates the network-wide projection's variables outside the layers' remat regions (variables
  created inside a lifted ``nn.remat`` of another scope would leak its tracers); afterwards a no-op."""
  if shared.is_initializing():
    shared(jnp.zeros((1, max_len, heads, head_dim), shared.dtype))


class _ScannedBlock(_Block):
  """``_Block`` in ``nn.scan``'s (carry, x) → (carry, y) form; mask and deterministic are broadcast."""

  def __call__(self, x, mask=None, deterministic: bool = True):
    return super().__call__(x, mask, deterministic), None


_SCANNED_COLLECTIONS = {"params": 0, CONSTANTS: 0, "cache": 0}  # stacked on a leading depth axis by nn.scan


def _scan_layers(block, length: int):
  """``nn.scan`` of a (carry, x) → (carry, None) block over ``length`` layers; mask and deterministic broadcast."""
  return nn.scan(block, variable_axes=_SCANNED_COLLECTIONS, split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast), length=length)


class _Segment(nn.Module):
  """``segment`` scanned layers as one module: the unit that √L segment checkpointing rematerialises."""
  config: "LinformerConfig"
  k: int
  segment: int

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    block = self.config.remat_plan.layer(_ScannedBlock, static_argnums=(3,), scanned=True)
    x, _ = _scan_layers(block, self.segment)(config=self.config, k=self.k, scanned=True, name="layers")(
        x, mask, deterministic)
    return x, None


def _segment_view(segment: int):
  """Maps the (depth, ...) stacked variables of the plain scan to the (depth / segment, segment, ...) layout of
  the nested scan and back, so that the parameter tree does not depend on ``remat_every``."""
  def split(collections):
    return {name: {"layers": jax.tree_util.tree_map(lambda a: a.reshape((-1, segment) + a.shape[1:]), tree)}
            for name, tree in collections.items()}

  def merge(collections):
    return {name: jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), tree.get("layers", {}))
            for name, tree in collections.items()}

  return split, merge


def segment_length(remat_every, depth: int) -> Optional[int]:
  """The number of layers per checkpointed segment that ``remat_every`` asks for (None = no segments).

  Args:
    remat_every: None, an int s that divides ``depth``, or "sqrt": the smallest divisor of ``depth`` that is
      >= √depth (⌈√depth⌉ whenever that divides it), so that depth / s segment inputs plus the s layers of the
      segment being recomputed are kept: activation memory grows as √depth.
    depth: the number of layers.

  Returns:
    s, or None.

  Raises:
    ValueError: an s that does not divide ``depth`` (the message lists the divisors), or another string.
    TypeError: neither None, an int nor a string.
  """
  if remat_every is None:
    return None
  divisors = [s for s in range(1, depth + 1) if depth % s == 0]
  if isinstance(remat_every, str):
    check_choice("remat_every", remat_every, ("sqrt",))
    return min(s for s in divisors if s * s >= depth)
  check_int("remat_every", remat_every, minimum=1)
  if depth % remat_every:
    raise ValueError(f"remat_every={remat_every} does not divide depth={depth}: the layers are checkpointed in "
                     f"segments of equal length; use one of {divisors}, or 'sqrt'.")
  return remat_every


class _Derived:
  """What the layers need derived from the Linformer fields, stated once (``LinformerFields`` and
  ``LinformerConfig`` both have it)."""

  @property
  def layer_head_dim(self) -> int:
    """Width per head: head_dim, or dim // num_heads."""
    return self.head_dim or self.dim // self.num_heads

  @property
  def ff_dim(self) -> int:
    """Feed-forward hidden width: dim_ff, or 4·dim."""
    return self.dim_ff or 4 * self.dim

  @property
  def remat_plan(self) -> RematPlan:
    """The checkpoint level ``remat`` decoded (``linformer_jax.remat.RematPlan``)."""
    return RematPlan(self.remat, self.remat_policy)

  def k_per_layer(self, depth: Optional[int] = None) -> list[int]:
    """k_i = max(1, k - i·k_reduce_by_layer) for i = 0 … depth-1 (default: the encoder's depth)."""
    return [max(1, self.k - i * self.k_reduce_by_layer) for i in range(self.depth if depth is None else depth)]


class LinformerFields(_Derived, nn.Module):
  """The encoder's hyper-parameters, shared by ``Linformer`` and the models built on it.

  Attributes:
    max_len: largest sequence length n (E/F are (max_len × k)).
    dim: model width.
    depth: number of layers.
    num_heads: attention heads per layer.
    k: projected length of keys/values (layer 0; see k_reduce_by_layer).
    dim_ff: feed-forward hidden width; None = 4·dim.
    head_dim: width per head; None = dim // num_heads (dim must then be divisible by num_heads).
    sharing: "none" (E_i, F_i per head per layer) | "headwise" (one E, one F per layer) |
      "kv" (one matrix per layer for K and V) | "layerwise" (one matrix for the whole network).
    projection: "learnable" | "conv" | "mean_pool" | "max_pool" | "fixed".
    projection_bias: bias on E/F (linformer-pytorch compatibility).
    k_reduce_by_layer: r; layer i projects to k_i = max(1, k - i·r) (paper Sec. 4, nonuniform k).
    attention: "linformer" | "full" (ordinary softmax attention, same block).
    norm: "pre" (pre-LN with a final LayerNorm) | "post" (post-LN, as linformer-pytorch; no final LN).
    activation: "gelu" (exact) | "relu" in the feed-forward.
    include_ff: whether each layer has a feed-forward sub-layer.
    w_o_intermediate_dim: None, or w for a two-matrix output projection h·d_h → w → dim.
    dropout: dropout on sub-layer outputs and inside the feed-forward.
    attention_dropout: dropout on the attention weights.
    causal: position t attends to positions <= t only. With attention="linformer" it is the exactly causal
      Linformer (``linformer_jax.layers.causal_linformer``: the projection of the prefix; every sharing mode;
      projection "learnable" or "fixed", else ``CAUSAL_ERROR``).
    remat: checkpoint level "C0" (none) | "C1" (each sub-layer rematerialised) | "C2" (each layer
      rematerialised, with the attention core one head at a time and the feed-forward in sequence chunks
      inside); see ``linformer_jax.remat``. The parameter tree does not depend on it.
    remat_policy: what rematerialised regions keep: one of ``linformer_jax.remat.REMAT_POLICIES``.
    scan_layers: run the identical layers with ``nn.scan`` (params stacked on a leading depth axis under
      ``layers``): compile time roughly independent of depth. Needs identical layers, so not with
      k_reduce_by_layer > 0 or sharing="layerwise".
    layer_norm_eps: LayerNorm epsilon (1e-5 as PyTorch).
    attention_impl: the softmax kernel of every attention layer: "xla" | "dot_product_attention"; None = the
      default for the backend and dtype (``linformer_jax.layers.default_implementation``).
    attention_block_rows: queries per block of that kernel (the "xla" one); None = the backend's default
      (``linformer_jax.layers.default_block_rows``: blocks only for large scores on the CPU), 0 = never block.
    remat_every: √L segment checkpointing of scanned layers: None (off) | s (an int dividing depth) | "sqrt"
      (``segment_length``). The layers run as depth / s segments of s under one ``jax.checkpoint`` each (a nested
      scan), so the backward pass keeps the segment inputs and recomputes one segment at a time; the level
      ``remat`` still applies inside a segment. Needs scan_layers=True; the parameter tree is unchanged.
    causal_chunk: positions per chunk c of the causal Linformer (cost O(n (c + k) d) per head); only with
      causal=True and attention="linformer".
    decoding: one token per call with a ``"cache"`` collection, for autoregressive generation
      (``linformer_jax.generate``): the causal Linformer carries a (batch, heads, k, d) state per layer, full
      attention a key/value cache of max_len positions. Needs causal=True. The checkpoint level does not apply
      when decoding (no gradients; the values are the same at every level).
  """
  max_len: int
  dim: int
  depth: int
  num_heads: int
  k: int
  dim_ff: Optional[int] = None
  head_dim: Optional[int] = None
  sharing: str = "none"
  projection: str = "learnable"
  projection_bias: bool = False
  k_reduce_by_layer: int = 0
  attention: str = "linformer"
  norm: str = "pre"
  activation: str = "gelu"
  include_ff: bool = True
  w_o_intermediate_dim: Optional[int] = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  causal: bool = False
  remat: str = "C0"
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  attention_block_rows: Optional[int] = None
  causal_chunk: int = DEFAULT_CHUNK
  decoding: bool = False
  remat_every: Any = None
  #: The compute dtype ("float32" | "bfloat16" | "float16" names in a config, ``jnp.bfloat16`` etc. here):
  #: every matmul (embeddings, Q/K/V/O, E/F projections, attention einsums, feed-forward, LM head, tied
  #: ``attend``) runs on operands of this dtype, and activations between layers are stored in it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored (and updated) in; cast to ``dtype`` where they are used.
  #: What stays float32 whatever ``dtype`` says (``linformer_jax.layers``): LayerNorm statistics and
  #: normalisation, the attention logits and softmax (its weights are cast to ``dtype`` for weights·V), the loss
  #: and the optimizer state — the sums and exponentials whose rounding error would otherwise grow with n.
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self):
    check_int("max_len", self.max_len, minimum=1)
    check_int("dim", self.dim, minimum=1)
    check_int("depth", self.depth, minimum=1)
    check_int("num_heads", self.num_heads, minimum=1)
    check_int("dim_ff", self.dim_ff, minimum=1, allow_none=True)
    check_int("head_dim", self.head_dim, minimum=1, allow_none=True)
    check_int("w_o_intermediate_dim", self.w_o_intermediate_dim, minimum=1, allow_none=True)
    check_int("k_reduce_by_layer", self.k_reduce_by_layer, minimum=0)
    check_choice("sharing", self.sharing, SHARING)
    check_choice("projection", self.projection, PROJECTIONS)
    check_choice("attention", self.attention, ATTENTIONS)
    check_choice("norm", self.norm, NORMS)
    check_choice("activation", self.activation, tuple(ACTIVATIONS))
    RematPlan(self.remat, self.remat_policy)  # validates level and policy
    for flag in ("projection_bias", "include_ff", "causal", "scan_layers", "decoding"):
      check_bool(flag, getattr(self, flag))
    check_rate("dropout", self.dropout)
    check_rate("attention_dropout", self.attention_dropout)
    check_kernel_args(self.attention_impl, self.attention_block_rows,
                      names=("attention_impl", "attention_block_rows"))
    as_dtype("dtype", self.dtype)
    as_dtype("param_dtype", self.param_dtype)
    if self.attention == "linformer":
      check_projected_length(self.k, self.max_len)
    else:
      check_int("k", self.k, minimum=1)
    if self.head_dim is None and self.dim % self.num_heads:
      raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim "
                       "explicitly or choose num_heads dividing dim.")
    if self.sharing == "layerwise" and self.k_reduce_by_layer:
      raise ValueError(f"k_reduce_by_layer={self.k_reduce_by_layer} cannot be used with "
                       "sharing='layerwise': one matrix shared by all layers has a single k. Use "
                       "sharing 'none', 'headwise' or 'kv', or k_reduce_by_layer=0.")
    check_int("causal_chunk", self.causal_chunk, minimum=1)
    segment_length(self.remat_every, self.depth)
    if self.remat_every is not None and not self.scan_layers:
      raise ValueError(f"remat_every={self.remat_every!r} checkpoints segments of scanned layers: it needs "
                       "scan_layers=True (remat C1/C2 checkpoint unscanned layers one at a time).")
    if self.decoding and not self.causal:
      raise ValueError("decoding=True (one token per call, from a cache) needs causal=True: a bidirectional model's "
                       "every position attends to later tokens, which a decoder has not produced yet.")
    if self.causal and self.attention == "linformer" and self.projection not in CAUSAL_PROJECTIONS:
      raise ValueError(f"projection={self.projection!r}: {CAUSAL_ERROR}")
    if self.scan_layers and self.attention == "linformer" and (self.k_reduce_by_layer or
                                                                self.sharing == "layerwise"):
      raise ValueError(
          "scan_layers=True needs identical layers, but "
          + (f"k_reduce_by_layer={self.k_reduce_by_layer} gives each layer its own k"
             if self.k_reduce_by_layer else "sharing='layerwise' shares one matrix across layers")
          + "; use scan_layers=False (remat C1/C2 still apply), or k_reduce_by_layer=0 and another sharing.")

  def encoder_fields(self) -> dict:
    """The LinformerFields of this module as a dict (to build a ``Linformer`` from a wrapper)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(LinformerConfig)}

  def config(self) -> "LinformerConfig":
    """The (validated) fields as a frozen ``LinformerConfig``, which the layers are built from."""
    return LinformerConfig(**self.encoder_fields())


#: Frozen dataclass with the fields of ``LinformerFields`` (see its own docstring).
LinformerConfig = dataclasses.make_dataclass(
    "LinformerConfig",
    [(f.name, f.type, dataclasses.field(default=f.default, kw_only=True))
     for f in dataclasses.fields(LinformerFields) if f.name not in ("parent", "name")],
    bases=(_Derived,), frozen=True)
LinformerConfig.__module__ = __name__
LinformerConfig.__doc__ = """Frozen copy of a model's ``LinformerFields`` (same names, types and defaults; the fields
are defined and validated once, on ``LinformerFields``), passed whole to every layer as in the flax wmt example's
``TransformerConfig``. Build it with ``model.config()``."""


class Linformer(LinformerFields):
  """The Linformer encoder stack: ``depth`` layers of attention and feed-forward sub-layers on vectors.

  The fields are those of ``LinformerFields``.
  """

  def _check_inputs(self, x, mask):
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"x must have shape (batch, n, dim={self.dim}), got {x.shape}.")
    check_length("x", x.shape[1], self.max_len)
    check_mask(mask, x.shape[0], x.shape[1])

  def _shared_projection(self):
    if self.sharing != "layerwise" or self.attention != "linformer":
      return None
    return SeqProjection(self.max_len, self.k, self.projection, use_bias=self.projection_bias,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="EF")

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    """Runs the encoder layers (and, with norm="pre", the final LayerNorm).

    Args:
      x: (batch, n, dim) float, n <= max_len.
      mask: (batch, n) bool, True = real token; None = all real.
      deterministic: False enables dropout (rng "dropout").

    Returns:
      (batch, n, dim).

    Raises:
      ValueError: a wrong shape of ``x`` or ``mask``, or n > max_len.
    """
    self._check_inputs(x, mask)
    config = self.config()
    if self.decoding:  # no gradients: rematerialisation would change nothing
      config = dataclasses.replace(config, remat="C0", remat_every=None)
    plan = config.remat_plan
    shared = self._shared_projection()
    if shared is not None and plan.level != "C0":
      _create_shared_variables(shared, self.max_len, self.num_heads, config.layer_head_dim)
    segment = segment_length(config.remat_every, self.depth)
    if self.scan_layers and segment is not None:
      split, merge = _segment_view(segment)
      checkpointed = nn.remat(_Segment, policy=checkpoint_policy("nothing_saveable"), static_argnums=(3,),
                              prevent_cse=False)
      segments = nn.map_variables(_scan_layers(checkpointed, self.depth // segment), tuple(_SCANNED_COLLECTIONS),
                                  trans_in_fn=split, trans_out_fn=merge, init=True, mutable=True)
      x, _ = segments(config=config, k=self.k, segment=segment, name="layers")(x, mask, deterministic)
    elif self.scan_layers:
      block = plan.layer(_ScannedBlock, static_argnums=(3,), scanned=True)
      x, _ = _scan_layers(block, self.depth)(config=config, k=self.k, scanned=True, name="layers")(
          x, mask, deterministic)
    else:
      block = plan.layer(_Block, static_argnums=(3,))
      for i, k_i in enumerate(config.k_per_layer()):
        x = block(config=config, k=k_i, shared_projection=shared, name=f"layer_{i}")(x, mask, deterministic)
    if self.norm == "pre":
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="ln_final")(x)
    return x


class LinformerLM(LinformerFields, kw_only=True):
  """Token + position embedding → ``Linformer`` → vocabulary logits (masked-LM use).

  The encoder's fields are those of ``LinformerFields``; the model adds:

  Attributes:
    vocab_size: number of token ids (keyword-only, required).
    pos_emb: "learned" | "sinusoidal" position embedding (see ``TokenEmbedder``).
    tie_embeddings: logits through the transposed token embedding instead of a separate ``head`` Dense.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from linformer_jax.models import LinformerLM
    >>> model = LinformerLM(vocab_size=256, max_len=16, dim=32, depth=2, num_heads=4, k=8)
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> variables = model.init(jax.random.key(0), tokens)
    >>> logits = model.apply(variables, tokens)
    >>> logits.shape, logits.dtype
    ((2, 16, 256), dtype('float32'))
    >>> mask = jnp.arange(16)[None, :] < jnp.array([[16], [10]])  # the second row has 6 padding tokens
    >>> model.apply(variables, tokens, mask=mask).shape
    (2, 16, 256)
  """
  vocab_size: int
  pos_emb: str = "learned"
  tie_embeddings: bool = False

  def __post_init__(self):
    check_int("vocab_size", self.vocab_size, minimum=1)
    check_choice("pos_emb", self.pos_emb, POS_EMBS)
    check_bool("tie_embeddings", self.tie_embeddings)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, mask=None, deterministic: bool = True):
    """Logits of every position.

    Args:
      tokens: (batch, n) int token ids, n <= max_len.
      mask: (batch, n) bool, True = real token; None = all real.
      deterministic: False enables dropout (rng "dropout").

    Returns:
      logits (batch, n, vocab_size).
    """
    embed = TokenEmbedder(self.vocab_size, self.dim, self.max_len, self.pos_emb, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="embed")
    offset = None
    if self.decoding:  # the position of this call's token: a counter in the cache
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      offset = position.value
      if not self.is_initializing():
        position.value = offset + tokens.shape[1]
    x = nn.Dropout(self.dropout)(embed(tokens, offset), deterministic=deterministic)
    x = Linformer(**self.encoder_fields(), name="encoder")(x, mask, deterministic)
    if self.tie_embeddings:
      return embed.attend(x)
    return nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    dot_general=flat_dot_general, name="head")(x)


class LinformerClassifier(LinformerFields, kw_only=True):
  """Sequence classifier: (embedding →) ``Linformer`` → CLS or masked-mean pooling → head → logits.

  The encoder's fields are those of ``LinformerFields``; the model adds:

  Attributes:
    num_classes: number of classes (keyword-only, required).
    vocab_size: int = inputs are token ids (batch, n) embedded with a ``TokenEmbedder``; None = inputs are
      already vectors (batch, n, dim).
    pool: "cls" (a learned CLS vector is prepended, so the encoder is built for max_len + 1 positions) |
      "mean" (mean over real tokens).
    head: "mlp" (the default, as in earlier versions: Dense(mlp_dim) named ``pre_logits`` → activation →
      Dense(num_classes) named ``head``) | "linear" (one Dense(num_classes) named ``head``: the logits are linear
      in the pooled features, as ``get_classifier`` and class activation maps need).
    mlp_dim: hidden width of the "mlp" head; None = dim. Must be None with head="linear".
    pos_emb: "learned" | "sinusoidal" (token inputs only).

  Classifier API (timm's names, as ``XCiT`` and ``VisionTransformer``)::

    feats = model.apply(variables, inputs, mask, method=model.forward_features)   # (batch, [1 +] n, dim)
    logits = model.apply(variables, feats, mask, method=model.forward_head)      # (batch, num_classes)
    w = model.get_classifier(variables)          # head="linear" only: {"kernel": (dim, C), "bias": (C,)}
    new_model, transfer = model.reset_classifier(5)

  With head="linear", the class activation map CAM_c[t] = feats[:, t] · w["kernel"][:, c] + w["bias"][c] gives
  logit c as its mean over the real tokens (pool="mean", masked) or as its value at the CLS position t = 0
  (pool="cls").
  """
  num_classes: int
  vocab_size: Optional[int] = None
  pool: str = "cls"
  head: str = "mlp"
  mlp_dim: Optional[int] = None
  pos_emb: str = "learned"

  def __post_init__(self):
    check_int("num_classes", self.num_classes, minimum=1)
    check_int("vocab_size", self.vocab_size, minimum=1, allow_none=True)
    check_int("mlp_dim", self.mlp_dim, minimum=1, allow_none=True)
    check_choice("pool", self.pool, ("cls", "mean"))
    check_choice("head", self.head, ("mlp", "linear"))
    check_choice("pos_emb", self.pos_emb, POS_EMBS)
    if self.head == "linear" and self.mlp_dim is not None:
      raise ValueError(f"mlp_dim={self.mlp_dim} is unused with head='linear' (one Dense(num_classes)); remove "
                       "mlp_dim, or use head='mlp' for a hidden layer of that width.")
    super().__post_init__()

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.vocab_size is not None:
      self.embed = TokenEmbedder(self.vocab_size, self.dim, self.max_len, self.pos_emb, **kw)
    # the name the earlier compact version gave it: the dropout draws stay the same
    self.input_dropout = nn.Dropout(self.dropout, name="Dropout_0")
    fields = self.encoder_fields()
    if self.pool == "cls":
      self.cls_token = self.param("cls", nn.initializers.zeros, (1, 1, self.dim), self.param_dtype)
      fields["max_len"] = self.max_len + 1
      fields["k"] = min(self.k, fields["max_len"])
    self.encoder = Linformer(**fields)
    if self.head == "mlp":
      self.hidden = nn.Dense(self.mlp_dim or self.dim, **kw, name="pre_logits")
    self.classifier = nn.Dense(self.num_classes, **kw, name="head")

  def forward_features(self, inputs, mask=None, deterministic: bool = True):
    """The encoder output, before pooling.

    Args:
      inputs: token ids (batch, n) int (vocab_size set) or vectors (batch, n, dim) float; n <= max_len.
      mask: (batch, n) bool, True = real token; None = all real.
      deterministic: False enables dropout (rng "dropout").

    Returns:
      (batch, n, dim), or (batch, 1 + n, dim) with the CLS position first when pool="cls".

    Raises:
      ValueError: n > max_len, or a mask of another shape.
    """
    b, n = inputs.shape[:2]
    check_length("inputs", n, self.max_len)
    check_mask(mask, b, n)
    x = self.embed(inputs) if self.vocab_size is not None else inputs
    x = self.input_dropout(x, deterministic=deterministic)
    if self.pool == "cls":
      x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
      mask = None if mask is None else jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    return self.encoder(x, mask, deterministic)

  def forward_head(self, features, mask=None, pre_logits: bool = False, deterministic: bool = True):
    """Pooling and head.

    Args:
      features: ``forward_features``' output, (batch, n, dim) or (batch, 1 + n, dim) for pool="cls".
      mask: the (batch, n) mask given to ``forward_features``: pool="mean" averages over its real tokens,
        pool="cls" reads position 0 (the mask's shape is still checked).
      pre_logits: return the input of the final linear map instead of the logits.
      deterministic: accepted so that calls mirror ``forward_features``; the head has no dropout.

    Returns:
      logits (batch, num_classes); with pre_logits: the pooled features (batch, dim) for head="linear", the hidden
      layer after its activation (batch, mlp_dim or dim) for head="mlp".

    Raises:
      ValueError: a mask of another shape.
    """
    del deterministic
    b, t = features.shape[:2]
    check_mask(mask, b, t - 1 if self.pool == "cls" else t)
    if self.pool == "cls":
      x = features[:, 0]
    else:
      w = jnp.ones((b, t), features.dtype) if mask is None else mask.astype(features.dtype)
      x = jnp.einsum("bn,bnd->bd", w, features) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
    if self.head == "mlp":
      x = ACTIVATIONS[self.activation](self.hidden(x))
    return x if pre_logits else self.classifier(x)

  def __call__(self, inputs, mask=None, deterministic: bool = True):
    """Logits, ``forward_head(forward_features(inputs, mask), mask)``.

    Args:
      inputs: token ids (batch, n) int (vocab_size set) or vectors (batch, n, dim) float; n <= max_len.
      mask: (batch, n) bool, True = real token; None = all real.
      deterministic: False enables dropout (rng "dropout").

    Returns:
      logits (batch, num_classes).
    """
    features = self.forward_features(inputs, mask, deterministic)
    return self.forward_head(features, mask, deterministic=deterministic)

  @nn.nowrap
  def get_classifier(self, variables) -> dict:
    """The linear map that produces the logits from ``forward_head(..., pre_logits=True)``'s features.

    Args:
      variables: this model's variables.

    Returns:
      {"kernel": (dim, num_classes), "bias": (num_classes,)}.

    Raises:
      ValueError: head="mlp", whose logits are not linear in the pooled features.
    """
    if self.head != "linear":
      raise ValueError(
          "get_classifier: LinformerClassifier(head='mlp') has no linear classifier on the pooled features: its "
          "logits are head(activation(pre_logits(pooled))), and params['head']['kernel'] "
          f"({self.mlp_dim or self.dim}, {self.num_classes}) maps the hidden layer, so a class activation map "
          "built from it would be wrong. Use a model built with head='linear' (e.g. create_model(..., "
          "head='linear'), then train or fine-tune it).")
    head = variables["params"]["head"]
    return {"kernel": head["kernel"], "bias": head["bias"]}

  @nn.nowrap
  def reset_classifier(self, num_classes: int):
    """timm's ``reset_classifier``, functional: a copy of this model with a new head of num_classes outputs.

    Args:
      num_classes: outputs of the new head (>= 1: this model always has a head; for features use
        ``forward_features`` or ``forward_head(..., pre_logits=True)``).

    Returns:
      ``(new_model, transfer)``; ``transfer(variables, rng) -> new_variables`` keeps every variable but the
      ``head`` Dense (the "mlp" head's hidden layer ``pre_logits`` included) and initialises a new one with rng.

    Raises:
      ValueError: num_classes < 1.
    """
    if num_classes == 0:
      raise ValueError("LinformerClassifier always has a head (num_classes >= 1); for the features without one "
                       "use forward_features, or forward_head(..., pre_logits=True).")
    new_model = self.clone(num_classes=num_classes)
    features = jnp.zeros((1, 2, self.dim), jnp.float32)

    def transfer(variables, rng: jax.Array):
      head = new_model.init(rng, features, method="forward_head")["params"]["head"]
      return {**variables, "params": {**variables["params"], "head": head}}

    return new_model, transfer


class _DecoderBlock(_Block):
  """Causal self-attention → Linformer cross-attention over the encoder output → feed-forward; fields as
  ``_Block`` (``k``: the projected length of both attentions) plus:

  Attributes:
    self_attention: "full" (causal softmax attention) | "linformer" (the exactly causal Linformer over the
      target's ``target_len`` positions).
    target_len: the longest target sequence.
  """
  self_attention: str = "full"
  target_len: int = 1

  @nn.compact
  def __call__(self, y, enc, tgt_mask=None, src_mask=None, deterministic: bool = True):
    self_attend = lambda block, h, tgt_mask: self._attention(
        block, "self_attention", self.self_attention, causal=True, max_len=self.target_len)(
            h, None, tgt_mask, deterministic)
    cross_attend = lambda block, h, enc, src_mask: self._attention(block, "cross_attention", "linformer")(
        h, enc, src_mask, deterministic)
    y = self._sublayer(y, self_attend, "self_attention", deterministic, tgt_mask)
    y = self._sublayer(y, cross_attend, "cross_attention", deterministic, enc, src_mask)
    return self._feed_forward_sublayer(y, deterministic)


class LinformerEncDec(LinformerFields, kw_only=True):
  """Encoder–decoder: Linformer encoder; decoder layers = causal full self-attention + Linformer
  cross-attention over the encoder output (with the encoder mask) + feed-forward; teacher-forced logits.

  The fields of ``LinformerFields`` configure the encoder and the decoder's cross-attention; the model adds:

  Attributes:
    vocab_size: source vocabulary size (keyword-only, required).
    target_vocab_size: target vocabulary size; None = vocab_size.
    max_target_len: longest target sequence; None = max_len.
    decoder_depth: number of decoder layers; None = depth.
    pos_emb: "learned" | "sinusoidal" position embeddings of source and target.
    decoder_self_attention: "full" (causal softmax attention, the default) | "linformer" (the exactly causal
      Linformer, projecting the target's max_target_len positions to k: sharing "none", "headwise" or "kv";
      projection "learnable" or "fixed").
  """
  vocab_size: int
  target_vocab_size: Optional[int] = None
  max_target_len: Optional[int] = None
  decoder_depth: Optional[int] = None
  pos_emb: str = "learned"
  decoder_self_attention: str = "full"

  def __post_init__(self):
    check_int("vocab_size", self.vocab_size, minimum=1)
    check_int("target_vocab_size", self.target_vocab_size, minimum=1, allow_none=True)
    check_int("max_target_len", self.max_target_len, minimum=1, allow_none=True)
    check_int("decoder_depth", self.decoder_depth, minimum=1, allow_none=True)
    check_choice("pos_emb", self.pos_emb, POS_EMBS)
    check_choice("decoder_self_attention", self.decoder_self_attention, ATTENTIONS)
    if self.decoder_self_attention == "linformer":
      target_len = self.max_target_len or self.max_len
      if self.sharing == "layerwise":
        raise ValueError("decoder_self_attention='linformer' needs sharing 'none', 'headwise' or 'kv': the "
                         "network-wide E=F of sharing='layerwise' projects the source's max_len positions.")
      if self.projection not in CAUSAL_PROJECTIONS:
        raise ValueError(f"decoder_self_attention='linformer', projection={self.projection!r}: {CAUSAL_ERROR}")
      if self.k > target_len:
        raise ValueError(f"decoder_self_attention='linformer' projects the target's {target_len} positions "
                         f"(max_target_len) to k={self.k}; k must be <= {target_len}.")
    super().__post_init__()

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.src_embed = TokenEmbedder(self.vocab_size, self.dim, self.max_len, self.pos_emb, **kw)
    self.tgt_embed = TokenEmbedder(self.target_vocab_size or self.vocab_size, self.dim,
                                   self.max_target_len or self.max_len, self.pos_emb, **kw)
    self.encoder = Linformer(**self.encoder_fields())
    depth = self.decoder_depth or self.depth
    self.decoder_EF = (SeqProjection(self.max_len, self.k, self.projection, use_bias=self.projection_bias,
                                     **kw) if self.sharing == "layerwise" else None)
    config = self.config()
    decoder_block = config.remat_plan.layer(_DecoderBlock, static_argnums=(5,))
    self.decoder_layers = [decoder_block(config=config, k=k_i, shared_projection=self.decoder_EF,
                                         self_attention=self.decoder_self_attention,
                                         target_len=self.max_target_len or self.max_len)
                           for k_i in config.k_per_layer(depth)]
    self.decoder_ln = nn.LayerNorm(epsilon=self.layer_norm_eps, **kw) if self.norm == "pre" else None
    self.logits = nn.Dense(self.target_vocab_size or self.vocab_size, dot_general=flat_dot_general, **kw)
    self.drop = nn.Dropout(self.dropout)

  def encode(self, src, src_mask=None, deterministic: bool = True):
    """src (batch, n) int → encoder output (batch, n, dim)."""
    x = self.drop(self.src_embed(src), deterministic=deterministic)
    return self.encoder(x, src_mask, deterministic)

  def decode(self, enc, tgt_in, src_mask=None, tgt_mask=None, deterministic: bool = True):
    """Encoder output (batch, n, dim) and target prefix tokens (batch, m) → logits (batch, m, vocab)."""
    check_mask(tgt_mask, tgt_in.shape[0], tgt_in.shape[1], "tgt_mask")
    y = self.drop(self.tgt_embed(tgt_in), deterministic=deterministic)
    if self.decoder_EF is not None and self.remat != "C0":
      _create_shared_variables(self.decoder_EF, self.max_len, self.num_heads, self.layer_head_dim)
    for layer in self.decoder_layers:
      y = layer(y, enc, tgt_mask, src_mask, deterministic)
    if self.decoder_ln is not None:
      y = self.decoder_ln(y)
    return self.logits(y)

  def __call__(self, src, tgt_in, src_mask=None, tgt_mask=None, deterministic: bool = True):
    """Teacher-forced logits: ``decode(encode(src, src_mask), tgt_in, src_mask, tgt_mask)``.

    Args:
      src: source token ids (batch, n) int, n <= max_len.
      tgt_in: decoder input (batch, m) int: the target shifted right (``shift_right``), m <= max_target_len.
      src_mask: (batch, n) bool, True = real token; None = all real.
      tgt_mask: (batch, m) bool, True = real token; None = all real.
      deterministic: False enables dropout (rng "dropout").

    Returns:
      logits (batch, m, target_vocab_size).
    """
    enc = self.encode(src, src_mask, deterministic)
    return self.decode(enc, tgt_in, src_mask, tgt_mask, deterministic)


def shift_right(tokens: jax.Array, bos_id: int = 0) -> jax.Array:
  """Teacher-forcing decoder input: (batch, m) → [bos, t_0, …, t_{m-2}]."""
  return jnp.pad(tokens, ((0, 0), (1, 0)), constant_values=bos_id)[:, :-1]


def count_projection_matrices(variables) -> int:
  """Number of distinct E/F matrices (or conv kernels) in a Linformer variable tree.

  Counts each projection node named E, F, EF or decoder_EF (in "params" or "constants"): a learnable/fixed
  ``kernel`` is (max_len, k) or per head (h, max_len, k); a conv ``conv_kernel`` is (s, d, d) or per head
  (h, s, d, d). A per-head kernel counts once per head. Pooling projections have no matrices.
  """
  total = 0

  def visit(tree, parent_name):
    nonlocal total
    for name, sub in tree.items():
      if hasattr(sub, "items"):
        visit(sub, name)
      elif parent_name in ("E", "F", "EF", "decoder_EF") and name in ("kernel", "conv_kernel"):
        shared_rank = 2 if name == "kernel" else 3
        total += 1 if sub.ndim == shared_rank else sub.shape[0]

  for collection in ("params", CONSTANTS):
    if collection in variables:
      visit(variables[collection], collection)
  return total
