"""Checkpoint levels C0/C1/C2 (from linformer-pytorch) as ``jax.checkpoint`` (remat) policies.

* ``C0``: no rematerialisation; every intermediate of the forward pass is kept for the backward pass.
* ``C1``: each attention and feed-forward sub-layer is wrapped in ``nn.remat``: only its inputs (and what the
  policy saves) are kept; the rest is recomputed in the backward pass, so depth costs little memory.
* ``C2``: C1's promise with less memory, so that head count and feed-forward width also cost little:

  - the attention core (scores, softmax, weighted sum) runs one head at a time under ``jax.checkpoint``
    inside ``lax.map``, so only one head's n×k (Linformer) / n×n (full) / d_h×d_h (XCA) intermediates are
    live at once — unlike the original, where all heads are still materialised together;
  - the feed-forward runs over the sequence in chunks under ``jax.checkpoint`` (``sequence_chunks``), so one
    chunk's hidden activations are no bigger than the sub-layer input;
  - the remat region is the whole layer rather than each sub-layer: one input per layer is kept across
    layers instead of C1's one per sub-layer. Inside the region nothing is saved beyond the per-head and
    per-chunk inputs, so the layer's backward pass recomputes its forward once, as at C1.

  Measured (docs/bench/remat.md): C2 temp memory is the same at 4 and 16 heads, and below C1 at every depth.

``remat_policy`` names what a rematerialised region may keep:

======================================  ====================================================================
name                                    keeps
======================================  ====================================================================
``nothing_saveable`` (default)          nothing but the region's inputs
``dots_saveable``                       results of all matmuls
``dots_with_no_batch_dims_saveable``    results of matmuls without batch dimensions (the weight matmuls)
``everything_saveable``                 everything (no saving; for testing)
``save_projections``                    the tagged q, k, v and the projected K̄ = E·K, V̄ = F·V (``checkpoint_name``)
``offload_dots``                        weight-matmul results, offloaded to pinned host memory (needs a backend with it)
======================================  ====================================================================

The parameter tree does not depend on the level: rematerialised modules keep their explicit names, so a
checkpoint saved at C0 loads at C1 and C2.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import check_choice

#: The checkpoint levels (see the module docstring).
REMAT_LEVELS = ("C0", "C1", "C2")
#: The names of ``remat_policy``: what a rematerialised region may keep (see the table above).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable", "save_projections", "offload_dots")
#: The ``checkpoint_name`` tags the ``save_projections`` policy keeps: q, k, v and the projected K̄, V̄.
SAVED_PROJECTION_NAMES = ("query", "key", "value", "k_bar", "v_bar")


def validate_remat(level: str, policy: str) -> None:
  """Raises ValueError for an unknown level or policy name, or an offload policy the backend can't run."""
  check_choice("remat", level, REMAT_LEVELS)
  check_choice("remat_policy", policy, REMAT_POLICIES)
  if policy == "offload_dots" and level != "C0":
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
      raise ValueError(f"remat_policy='offload_dots' needs pinned host memory, which backend "
                       f"{jax.default_backend()!r} does not offer (memory kinds: {sorted(kinds)}); choose one of "
                       f"{', '.join(p for p in REMAT_POLICIES if p != 'offload_dots')}.")


def checkpoint_policy(name: str) -> Optional[Callable]:
  """The ``jax.checkpoint`` policy for a name in ``REMAT_POLICIES``.

  Args:
    name: a policy name (see the table in the module docstring).

  Returns:
    The policy, for ``jax.checkpoint(..., policy=...)`` or ``nn.remat(..., policy=...)``.

  Raises:
    ValueError: ``name`` is not in ``REMAT_POLICIES``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from linformer_jax.remat import checkpoint_policy
    >>> f = lambda x: jnp.sum(jnp.tanh(x @ x))
    >>> g = jax.checkpoint(f, policy=checkpoint_policy("dots_with_no_batch_dims_saveable"))
    >>> x = jnp.ones((4, 4)) / 4
    >>> bool(jnp.allclose(jax.grad(g)(x), jax.grad(f)(x)))  # same gradient, other residuals kept
    True
    >>> checkpoint_policy("save_everything")
    Traceback (most recent call last):
    ...
    ValueError: ...
  """
  check_choice("remat_policy", name, REMAT_POLICIES)
  policies = jax.checkpoint_policies
  if name == "save_projections":
    return policies.save_only_these_names(*SAVED_PROJECTION_NAMES)
  if name == "offload_dots":
    return policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  return getattr(policies, name)


@dataclasses.dataclass(frozen=True)
class RematPlan:
  """A checkpoint level decoded once into what it means (hashable, so models pass it to their blocks).

  Attributes:
    level: "C0" | "C1" | "C2".
    policy: what rematerialised regions keep (``REMAT_POLICIES``).

  Examples:
    >>> from linformer_jax.remat import RematPlan
    >>> plan = RematPlan("C2")
    >>> plan.layer_region, plan.sublayer_regions, plan.per_head, plan.chunked_ff
    (True, False, True, True)
  """
  level: str = "C0"
  policy: str = "nothing_saveable"

  def __post_init__(self):
    validate_remat(self.level, self.policy)

  @property
  def layer_region(self) -> bool:
    """C2: each layer is one remat region."""
    return self.level == "C2"

  @property
  def sublayer_regions(self) -> bool:
    """C1: each sub-layer is one remat region."""
    return self.level == "C1"

  @property
  def per_head(self) -> bool:
    """C2: the attention core runs one head at a time."""
    return self.level == "C2"

  @property
  def chunked_ff(self) -> bool:
    """C2: the feed-forward runs in sequence chunks."""
    return self.level == "C2"

  def _region(self, on: bool, target, static_argnums: tuple[int, ...], scanned: bool):
    if not on:
      return target
    return nn.remat(target, policy=checkpoint_policy(self.policy), static_argnums=static_argnums,
                    prevent_cse=not scanned)

  def sublayer(self, target, static_argnums: tuple[int, ...] = (), scanned: bool = False):
    """``nn.remat(target)`` when ``sublayer_regions`` (C1), else ``target`` itself.

    target: a module class, or a function whose first argument is a module (flax's lifted form).
    static_argnums count ``self`` (or that module argument) as 0, e.g. (2,) for ``__call__(self, x,
    deterministic)``. Inside ``nn.scan`` CSE cannot merge the recomputation, so ``prevent_cse`` is off there
    (faster).
    """
    return self._region(self.sublayer_regions, target, static_argnums, scanned)

  def layer(self, target, static_argnums: tuple[int, ...] = (), scanned: bool = False):
    """``nn.remat(target)`` when ``layer_region`` (C2), else ``target`` itself. Arguments as ``sublayer``."""
    return self._region(self.layer_region, target, static_argnums, scanned)


def map_heads(fn: Callable, policy: str, *arrays: jax.Array, head_axis: int = 2,
              extra: Optional[jax.Array] = None) -> jax.Array:
  """Applies ``fn`` one head at a time under ``jax.checkpoint`` (level C2).

  arrays: each with the heads on ``head_axis`` (e.g. (batch, n, heads, d_h)); fn receives one head's slices
  with that axis kept at size 1, plus ``extra[h]`` if given (e.g. a per-head dropout key), and returns an array
  with a size-1 head axis at ``head_axis``. Returns the per-head results concatenated on ``head_axis``.
  """
  sliced = tuple(jnp.expand_dims(jnp.moveaxis(a, head_axis, 0), head_axis + 1) for a in arrays)
  body = jax.checkpoint(lambda xs: fn(*xs), policy=checkpoint_policy(policy))
  out = jax.lax.map(body, sliced + ((extra,) if extra is not None else ()))
  return jnp.moveaxis(jnp.squeeze(out, head_axis + 1), 0, head_axis)
