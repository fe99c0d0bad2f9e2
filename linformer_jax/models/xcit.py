"""XCiT: Cross-Covariance Image Transformers (El-Nouby et al. 2021, arXiv 2106.09681).

Images are NHWC float32. The forward pass (matching the official code and timm 1.0.31 ``xcit.py``):

    ConvPatchEmbed → + FourierPositionalEncoding → depth × XCABlock → prepend CLS →
    cls_attn_layers × ClassAttentionBlock → LayerNorm → head(token 0)

Parameter tree (names mirror timm's so the converter is a rename): ``patch_embed/{conv_i, bn_i}``,
``pos_embed/token_projection``, ``blocks_{i}/{norm1, attn/{qkv, temperature, proj}, gamma1, norm3,
local_mp/{conv1, bn, conv2}, gamma3, norm2, mlp/{wi, wo}, gamma2}``, ``cls_token``,
``cls_attn_blocks_{j}/{norm1, attn/{query, key, value, out}, gamma1, norm2, mlp, gamma2}``, ``norm``, ``head``.
BatchNorm statistics are in the ``"batch_stats"`` collection.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linformer_jax._validate import check_choice, check_int
from linformer_jax.layers.attention import FullSelfAttention
from linformer_jax.layers.conv import DepthwiseConv2D
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.drop_path import DropPath
from linformer_jax.layers.mlp import FeedForward, exact_gelu
from linformer_jax.layers.softmax_kernel import float32_einsum
from linformer_jax.models.image_classifier import BlockFields, TokenClassifier, check_images
from linformer_jax.remat import RematPlan, map_heads

#: LayerNorm epsilon everywhere in XCiT.
LN_EPS = 1e-6
#: BatchNorm running-average momentum in flax's convention (= PyTorch momentum 0.1).
BN_MOMENTUM = 0.9
#: BatchNorm epsilon.
BN_EPS = 1e-5
# Initialiser of the Dense kernels, the CLS token and the head: truncated normal, standard deviation 0.02.
_dense_init = nn.initializers.truncated_normal(0.02)


def _batch_norm(train: bool, axis_name: Optional[str], name: str, dtype=jnp.float32,
                param_dtype=jnp.float32) -> nn.BatchNorm:
  """XCiT's BatchNorm; statistics (and the running averages) in float32 whatever dtype, the output in dtype."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      axis_name=axis_name if train else None, dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(name: str, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.LayerNorm:
  """XCiT's LayerNorm; statistics and normalisation in float32 whatever dtype, the output in dtype."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


class XCA(nn.Module):
  """Cross-covariance attention: per head, a d_h × d_h attention between channels (linear in tokens N).

      q̂, k̂ = q / ‖q‖₂, k / ‖k‖₂ (over the N tokens);  A_h = softmax_j(τ_h · q̂ᵀ k̂);  out_i = Σ_j A_h[i, j] v_j

  The maps A (batch, heads, d_h, d_h) are sown as ``intermediates/…/attention_weights`` when that collection is
  mutable. ``xca_core`` computes the normalisation, logits and softmax in float32 whatever ``dtype``.

  Attributes:
    num_heads: number of heads h.
    qkv_bias: biases on the fused Q/K/V map.
    attention_dropout: dropout on the maps A.
    dropout: dropout after the output projection.
    normalize_qk: False = ablation without the L2 normalisation.
    learnable_temperature: False = τ fixed at 1.
    remat_heads: compute the core one head at a time under ``jax.checkpoint`` (level C2; maps are then not sown).
    remat_policy: the checkpoint policy name used then (one of ``linformer_jax.remat.REMAT_POLICIES``).
  """
  num_heads: int
  qkv_bias: bool = True
  attention_dropout: float = 0.0
  dropout: float = 0.0
  normalize_qk: bool = True
  learnable_temperature: bool = True

  remat_heads: bool = False
  remat_policy: str = "nothing_saveable"
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Applies XCA to tokens x (batch, N, C); ``deterministic=False`` enables dropout. Returns (batch, N, C)."""
    b, n, c = x.shape
    h = self.num_heads
    if c % h:
      raise ValueError(f"embed_dim={c} is not divisible by num_heads={h}.")
    dense = lambda features, name, **kw: nn.Dense(features, kernel_init=_dense_init, dot_general=flat_dot_general,
                                                  dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    qkv = dense(3 * c, "qkv", use_bias=self.qkv_bias)(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, h, c // h), 2, 0)  # each (b, N, h, d_h)
    temperature = (self.param("temperature", nn.initializers.ones, (h,), self.param_dtype)
                   if self.learnable_temperature else jnp.ones((h,), jnp.float32))
    rate = 0.0 if deterministic else self.attention_dropout
    rng = self.make_rng("dropout") if rate > 0.0 else None
    sow = self.is_mutable_collection("intermediates")
    if self.remat_heads and not sow:  # level C2: one head at a time (maps are sown only without it)
      keys = None if rng is None else jax.random.split(rng, h)
      t = jnp.broadcast_to(temperature[None, None, :, None], (1, 1, h, 1))
      one_head = lambda qh, kh, vh, th, key=None: xca_core(qh, kh, vh, th.reshape(1), self.normalize_qk,
                                                           rate, key)[0]
      out = map_heads(one_head, self.remat_policy, q, k, v, t, extra=keys)
    else:
      out, attn = xca_core(q, k, v, temperature, self.normalize_qk, rate, rng)
      if sow:
        self.sow("intermediates", "attention_weights", attn)
    out = dense(c, "proj")(out.reshape(b, n, c))  # channel = h·d_h + i
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


def xca_core(q, k, v, temperature, normalize_qk=True, dropout_rate=0.0, dropout_rng=None):
  """The XCA attention core. q, k, v (batch, N, h, d_h); temperature (h,).

  Half-precision q, k, v: the L2 norms over the N tokens, the logits (``float32_einsum``) and the softmax are
  float32; the normalised q, k and the weights are cast back to v's dtype for the two products.

  Returns out (batch, N, h, d_h) with out_i = Σ_j A[i, j] v_j (v's dtype), and A (batch, h, d_h, d_h) float32.
  """
  if normalize_qk:  # F.normalize: x / max(‖x‖, 1e-12) along the token axis
    unit = lambda x: (x / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=1, keepdims=True),
                                      1e-12)).astype(x.dtype)
    q, k = unit(q), unit(k)
  logits = float32_einsum("bnhi,bnhj->bhij", q, k) * temperature.astype(jnp.float32)[:, None, None]
  attn = jax.nn.softmax(logits, axis=-1)
  weights = attn
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, attn.shape)
    weights = jnp.where(keep, attn / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhij,bnhj->bnhi", weights.astype(v.dtype), v), attn


class LPI(nn.Module):
  """Local patch interaction: depthwise conv → GELU → BatchNorm → depthwise conv on the Hp × Wp token grid.

  BatchNorm statistics stay float32 whatever ``dtype``.

  Attributes:
    kernel_size: side of the square depthwise kernels.
    bn_axis_name: mapped axis name for cross-replica BatchNorm statistics; None = per-device statistics.
  """
  kernel_size: int = 3
  bn_axis_name: Optional[str] = None
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid: tuple[int, int], train: bool = False) -> jax.Array:
    """Applies the block to the token grid.

    Args:
      x: (batch, Hp·Wp, C), tokens in row-major grid order.
      grid: (Hp, Wp).
      train: BatchNorm uses and updates batch statistics (``batch_stats`` mutable).

    Returns:
      (batch, Hp·Wp, C).
    """
    b, n, c = x.shape
    conv = lambda name: DepthwiseConv2D((self.kernel_size, self.kernel_size), dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    y = conv("conv1")(x.reshape(b, *grid, c))
    y = _batch_norm(train, self.bn_axis_name, "bn", self.dtype, self.param_dtype)(exact_gelu(y))
    return conv("conv2")(y).reshape(b, n, c)


class ConvPatchEmbed(nn.Module):
  """Stack of stride-2 3×3 convs (no bias) with BatchNorm, GELU between stages: 4 stages for patch 16
  (3 → C/8 → C/4 → C/2 → C), 3 for patch 8. Each stage maps H → ⌊(H − 1)/2⌋ + 1 (padding 1 on each side,
  explicit as in PyTorch, not 'SAME').

  The convolutions run in ``dtype``, the BatchNorm statistics in float32.

  Attributes:
    patch_size: 16 (4 stages) or 8 (3 stages).
    embed_dim: output channels C.
    bn_axis_name: mapped axis name for cross-replica BatchNorm statistics; None = per-device statistics.
  """
  patch_size: int = 16
  embed_dim: int = 768
  bn_axis_name: Optional[str] = None
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Images (batch, H, W, in_chans) → patch tokens (batch, Hp, Wp, C) in ``dtype``.

    ``train``: BatchNorm uses and updates batch statistics (``batch_stats`` mutable).
    """
    stages = {16: 4, 8: 3}[self.patch_size]
    widths = [self.embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]
    x = images
    for i, width in enumerate(widths):
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv_{i}")(x)
      x = _batch_norm(train, self.bn_axis_name, f"bn_{i}", self.dtype, self.param_dtype)(x)
      if i < stages - 1:
        x = exact_gelu(x)
    return x


def fourier_features(hp: int, wp: int, hidden_dim: int = 32, temperature: float = 10000.0) -> np.ndarray:
  """(Hp·Wp, 2·hidden_dim) Fourier features of the grid: [y-features | x-features], each interleaved
  [sin(p/t_0), cos(p/t_0), sin(p/t_1), …] with p = (index+1)/(size+1e-6)·2π and t_i = T^(2⌊i/2⌋/hidden_dim)."""
  eps, scale = 1e-6, 2 * math.pi
  y = np.arange(1, hp + 1, dtype=np.float32) / (hp + eps) * scale
  x = np.arange(1, wp + 1, dtype=np.float32) / (wp + eps) * scale
  dim_t = temperature ** (2 * (np.arange(hidden_dim) // 2) / hidden_dim).astype(np.float32)

  def embed(p):  # (L,) → (L, hidden_dim)
    p = p[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(p), hidden_dim)

  fy = np.broadcast_to(embed(y)[:, None, :], (hp, wp, hidden_dim))
  fx = np.broadcast_to(embed(x)[None, :, :], (hp, wp, hidden_dim))
  return np.concatenate([fy, fx], axis=-1).reshape(hp * wp, 2 * hidden_dim).astype(np.float32)


class FourierPositionalEncoding(nn.Module):
  """Fourier features of the token grid (any Hp × Wp, computed on the fly) → 1×1 projection to C.

  The features are computed in float32 (``fourier_features``), the projection runs in ``dtype``.

  Attributes:
    dim: output width C.
    hidden_dim: Fourier features per axis.
    temperature: the base T of the frequencies.
  """
  dim: int
  hidden_dim: int = 32
  temperature: float = 10000.0
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid: tuple[int, int]) -> jax.Array:
    """The encoding of the grid (Hp, Wp): (Hp·Wp, C) in ``dtype``, row-major."""
    feats = jnp.asarray(fourier_features(*grid, self.hidden_dim, self.temperature))
    return nn.Dense(self.dim, dot_general=flat_dot_general, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="token_projection")(feats)


class XCABlock(BlockFields):
  """x ← x + γ1·XCA(LN(x));  x ← x + γ3·LPI(LN(x));  x ← x + γ2·MLP(LN(x))  (each branch with drop path).

  The LayerScale γ are stored in ``param_dtype`` and cast to ``dtype``. Besides the ``BlockFields``:

  Attributes:
    drop_path_rate: stochastic-depth rate of the three branches.
    eta: initial value of the LayerScale γ.
    use_lpi: False drops the LPI branch (ablation).
    attention: "xca" | "self" (ordinary softmax self-attention instead of XCA, ablation).
    normalize_qk: XCA's L2 normalisation (see ``XCA``).
    learnable_temperature: XCA's learnable τ (see ``XCA``).
    bn_axis_name: mapped axis name for cross-replica BatchNorm statistics in the LPI.
    remat: checkpoint level "C0" | "C1" | "C2" (see ``linformer_jax.remat``).
    remat_policy: what rematerialised regions keep (one of ``linformer_jax.remat.REMAT_POLICIES``).
    scanned: the block runs inside ``nn.scan``.
  """
  drop_path_rate: float = 0.0
  eta: float = 1.0
  use_lpi: bool = True
  attention: str = "xca"
  normalize_qk: bool = True
  learnable_temperature: bool = True
  bn_axis_name: Optional[str] = None
  remat: str = "C0"
  remat_policy: str = "nothing_saveable"
  scanned: bool = False
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @property
  def _plan(self) -> RematPlan:
    return RematPlan(self.remat, self.remat_policy)

  def _remat(self, cls, static_argnums):
    return self._plan.sublayer(cls, static_argnums, self.scanned)

  def _heads(self):
    return dict(remat_heads=self._plan.per_head, remat_policy=self.remat_policy, **self._precision())

  def _precision(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _gamma(self, name: str, c: int) -> jax.Array:
    """A LayerScale vector (c,), stored in param_dtype, in dtype for the product."""
    return self.param(name, nn.initializers.constant(self.eta), (c,), self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, grid: tuple[int, int], train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: (batch, N, C) patch tokens in row-major grid order.
      grid: (Hp, Wp) with Hp·Wp = N (for the LPI).
      train: enables dropout and drop path (rng "dropout") and BatchNorm batch statistics.

    Returns:
      (batch, N, C).
    """
    c = x.shape[-1]
    det = not train
    gamma = lambda name: self._gamma(name, c)
    norm = lambda name: _layer_norm(name, **self._precision())
    drop_path = lambda y: DropPath(self.drop_path_rate)(y, deterministic=det)
    if self.attention == "xca":
      attn = self._remat(XCA, (2,))(self.num_heads, self.qkv_bias, self.attn_drop_rate, self.drop_rate,
                                    self.normalize_qk, self.learnable_temperature, **self._heads(), name="attn")
      attend = lambda y: attn(y, det)
    else:
      attn = self._remat(FullSelfAttention, (4,))(self.num_heads, qkv_bias=self.qkv_bias,
                                                  attention_dropout=self.attn_drop_rate, **self._heads(),
                                                  name="attn")
      attend = lambda y: nn.Dropout(self.drop_rate)(attn(y, None, None, det), deterministic=det)
    x = x + drop_path(gamma("gamma1") * attend(norm("norm1")(x)))
    if self.use_lpi:
      lpi = self._remat(LPI, (2, 3))(bn_axis_name=self.bn_axis_name, **self._precision(), name="local_mp")
      x = x + drop_path(gamma("gamma3") * lpi(norm("norm3")(x), grid, train))
    mlp = self._remat(FeedForward, (2,))(int(c * self.mlp_ratio), "gelu", self.drop_rate,
                                         remat_chunks=self._plan.chunked_ff, remat_policy=self.remat_policy,
                                         **self._precision(), name="mlp")
    return x + drop_path(gamma("gamma2") * mlp(norm("norm2")(x), det))


class _ScannedXCABlock(XCABlock):
  """``XCABlock`` in ``nn.scan``'s (carry, x) → (carry, y) form; grid and train are broadcast."""

  def __call__(self, x, grid, train=False):
    return super().__call__(x, grid, train), None


class ClassAttentionBlock(BlockFields):
  """CaiT-style class attention: the CLS query attends over all tokens (CLS + patches).

  As in the official code and timm::

      xn = LN1(x);  x ← x + γ1·[CA(xn)_cls, xn_patches]
      tokens_norm: x ← LN2(x)   else: x_cls ← LN2(x_cls)
      x ← x + [γ2·MLP(x_cls), x_patches]      (so patch tokens are doubled here, exactly as the original)

  The CLS→token maps (batch, heads, 1, 1 + N) are sown as ``attn/attention_weights`` when "intermediates" is
  mutable. Besides the ``BlockFields``:

  Attributes:
    eta: initial value of the LayerScale γ.
    tokens_norm: apply LN2 to all tokens, not only the CLS token.
    remat: checkpoint level "C0" | "C1" | "C2" (see ``linformer_jax.remat``).
    remat_policy: what rematerialised regions keep (one of ``linformer_jax.remat.REMAT_POLICIES``).
  """
  eta: float = 1.0
  tokens_norm: bool = False
  remat: str = "C0"
  remat_policy: str = "nothing_saveable"
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  _plan = XCABlock._plan
  _remat = XCABlock._remat
  _heads = XCABlock._heads
  _precision = XCABlock._precision
  _gamma = XCABlock._gamma
  scanned = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to x (batch, 1 + N, C), CLS first; ``train`` enables dropout. Returns (batch, 1 + N, C)."""
    c = x.shape[-1]
    det = not train
    gamma = lambda name: self._gamma(name, c)
    xn = _layer_norm("norm1", **self._precision())(x)
    attn = self._remat(FullSelfAttention, (4,))(self.num_heads, qkv_bias=self.qkv_bias,
                                                attention_dropout=self.attn_drop_rate, **self._heads(),
                                                name="attn")
    cls = nn.Dropout(self.drop_rate)(attn(xn[:, :1], xn, None, det), deterministic=det)
    x = x + gamma("gamma1") * jnp.concatenate([cls, xn[:, 1:]], axis=1)
    norm2 = _layer_norm("norm2", **self._precision())
    x = norm2(x) if self.tokens_norm else jnp.concatenate([norm2(x[:, :1]), x[:, 1:]], axis=1)
    mlp = self._remat(FeedForward, (2,))(int(c * self.mlp_ratio), "gelu", self.drop_rate, **self._precision(),
                                         name="mlp")
    cls = gamma("gamma2") * mlp(x[:, :1], det)
    return x + jnp.concatenate([cls, x[:, 1:]], axis=1)


class XCiT(TokenClassifier):
  """The XCiT image classifier.

  The fields of ``TokenClassifier`` apply: ``img_size`` is the resolution the variant was published at (any H, W
  divisible by patch_size work); ``patch_size`` is 16 or 8; ``drop_rate`` is the dropout after attention
  projections, in MLPs and before the head; ``drop_path_rate`` is constant over the XCA blocks (as the original),
  none in the class-attention blocks; ``global_pool`` "token" is the published CLS pooling.

  With dtype=bfloat16 the stem convolutions, the Fourier projection, Q/K/V/proj, the XCA and class-attention
  products, the LPI convolutions, the MLPs and the head run in bfloat16, and the residual stream is bfloat16.
  float32 stay: the BatchNorm and LayerNorm statistics (and BatchNorm's running averages), XCA's L2 norms over the
  tokens, the attention logits and softmax (see ``linformer_jax.layers``), the loss and the optimizer state — sums
  over many terms and exponentials, whose bfloat16 rounding (2^-8 relative) would grow with the token count. The
  hand-written parameters (temperature, the γ's, cls_token) are stored in param_dtype and cast to dtype where used.

  Call: ``module.apply(variables, images, train=False)`` with images (batch, H, W, in_chans) float, H and W
  divisible by patch_size. ``train=True`` needs ``mutable=["batch_stats"]`` and a "dropout" rng when
  dropout/drop-path rates are non-zero. Returns logits (batch, num_classes).

  Attributes:
    cls_attn_layers: number of class-attention blocks.
    eta: LayerScale init.
    tokens_norm: LayerNorm over all tokens in the class-attention blocks (False only for the nano models).
    bn_axis_name: mapped axis name for cross-replica BatchNorm statistics in data-parallel training
      (SyncBatchNorm); None = per-device statistics.
    use_pos_embed: add the Fourier positional encoding (ablation switch).
    use_lpi: the LPI branch in every XCA block (ablation switch).
    attention: "xca" | "self" (ablation switch, see ``XCABlock``).
    normalize_qk: XCA's L2 normalisation (ablation switch).
    learnable_temperature: XCA's learnable τ (ablation switch).
    remat: "C0" | "C1" (each attention/LPI/MLP sub-layer rematerialised) | "C2" (each block rematerialised,
      attention one head at a time and the MLP in token chunks inside). The parameter tree does not depend on it.
    remat_policy: what rematerialised regions keep; see ``linformer_jax.remat``.
    scan_layers: run the XCA blocks with ``nn.scan`` (params and batch stats stacked under ``blocks``).
  """
  cls_attn_layers: int = 2
  eta: float = 1.0
  tokens_norm: bool = False
  bn_axis_name: Optional[str] = None
  use_pos_embed: bool = True
  use_lpi: bool = True
  attention: str = "xca"
  normalize_qk: bool = True
  learnable_temperature: bool = True
  remat: str = "C0"
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    check_choice("patch_size", self.patch_size, (16, 8))
    RematPlan(self.remat, self.remat_policy)  # validates level and policy
    check_int("cls_attn_layers", self.cls_attn_layers, minimum=0)
    super().__post_init__()
    if self.embed_dim % (2 ** ({16: 4, 8: 3}[self.patch_size] - 1)):
      raise ValueError(f"embed_dim={self.embed_dim} must be divisible by {2 ** ({16: 4, 8: 3}[self.patch_size] - 1)}"
                       f" for the patch-{self.patch_size} conv stem.")
    check_choice("attention", self.attention, ("xca", "self"))

  def setup(self):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = ConvPatchEmbed(self.patch_size, self.embed_dim, self.bn_axis_name, **precision)
    if self.use_pos_embed:
      self.pos_embed = FourierPositionalEncoding(self.embed_dim, **precision)
    self.cls_token = self.param("cls_token", _dense_init, (1, 1, self.embed_dim), self.param_dtype)
    block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                 drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
                 drop_path_rate=self.drop_path_rate, eta=self.eta, use_lpi=self.use_lpi, attention=self.attention,
                 normalize_qk=self.normalize_qk, learnable_temperature=self.learnable_temperature,
                 bn_axis_name=self.bn_axis_name, remat=self.remat, remat_policy=self.remat_policy, **precision)
    plan = RematPlan(self.remat, self.remat_policy)
    if self.scan_layers:
      scan = nn.scan(plan.layer(_ScannedXCABlock, (2, 3), scanned=True),
                     variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
                     length=self.depth)
      self.blocks = scan(**block, scanned=True)
    else:
      self.blocks = [plan.layer(XCABlock, (2, 3))(**block) for _ in range(self.depth)]
    cls_block = plan.layer(ClassAttentionBlock, (2,))
    self.cls_attn_blocks = [cls_block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                                      self.attn_drop_rate, self.eta, self.tokens_norm, self.remat,
                                      self.remat_policy, **precision)
                            for _ in range(self.cls_attn_layers)]
    self.norm = _layer_norm("norm", **precision)
    self.pos_drop = nn.Dropout(self.drop_rate)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, **precision)

  def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images (batch, H, W, in_chans) → tokens after the final LayerNorm, (batch, 1 + Hp·Wp, C) in dtype, CLS
    first."""
    check_images(images, self.in_chans, self.patch_size)
    x = self.patch_embed(images, train)
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp * wp, c)
    if self.use_pos_embed:
      x = x + self.pos_embed((hp, wp))[None].astype(x.dtype)
    x = self.pos_drop(x, deterministic=not train)
    if self.scan_layers:
      x, _ = self.blocks(x, (hp, wp), train)
    else:
      for blk in self.blocks:
        x = blk(x, (hp, wp), train)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, c)).astype(x.dtype), x], axis=1)
    for blk in self.cls_attn_blocks:
      x = blk(x, train)
    return self.norm(x)
