"""Dense maps as one 2-D matrix product, for a faster weight gradient.

A dense map contracts the trailing axes of x (..., in) with the leading axes of W (in, out). Written as one
``lax.dot_general`` on the N-d arrays (what ``flax.linen.Dense`` does), its weight gradient ∂W = xᵀ ḡ contracts
over all the leading (batch, position) axes at once; XLA:CPU then materialises a transposed copy of ḡ and runs
the product in a slow (transposed, transposed) form — the feed-forward weight gradients of the Linformer
benchmark ran far below the core's matrix peak (docs/benchmarks.md §2, "Dense maps as one 2-D product").
Folding the leading axes into one (x → (M, in), W → (in, out)) first gives a plain 2-D product whose gradient is
one (M, in)ᵀ (M, out) contraction, with no copy. Same values (the same sums); reshapes are free on every backend.

Usage: ``nn.Dense(features, dot_general=flat_dot_general)`` or ``nn.DenseGeneral(..., dot_general=...)``.
"""

from __future__ import annotations

import math

import jax
from jax import lax


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> jax.Array:
  """``lax.dot_general`` with the same result; a dense-map contraction runs as a 2-D product.

  lhs: ``(*lead, *contract)`` — contracting its trailing axes; rhs: ``(*contract, *out)`` — contracting its
  leading axes, in the same order; no batch axes. Anything else (batch axes, other orders) goes to
  ``lax.dot_general`` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract = tuple(int(a) % lhs.ndim for a in lhs_contract)
  rhs_contract = tuple(int(a) % rhs.ndim for a in rhs_contract)
  n_contract = len(lhs_contract)
  n_lead = lhs.ndim - n_contract
  dense_form = (not lhs_batch and not rhs_batch and n_contract > 0
                and lhs_contract == tuple(range(n_lead, lhs.ndim))
                and rhs_contract == tuple(range(n_contract)))
  if not dense_form or (n_lead <= 1 and n_contract == 1 and rhs.ndim == 2):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  lead, out = lhs.shape[:n_lead], rhs.shape[n_contract:]
  size = math.prod(lhs.shape[n_lead:])
  y = lax.dot_general(lhs.reshape(math.prod(lead), size), rhs.reshape(size, math.prod(out)),
                      (((1,), (0,)), ((), ())), precision=precision,
                      preferred_element_type=preferred_element_type)
  return y.reshape(lead + out)
