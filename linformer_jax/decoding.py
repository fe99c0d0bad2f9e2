"""Autoregressive generation from a causal ``LinformerLM``: one jitted ``lax.scan`` over the positions.

The model runs with ``decoding=True``, one token per step, from the ``"cache"`` collection: the causal Linformer
carries a (batch, heads, k, d) state per layer — constant in the context length — and full attention a key/value
cache of ``max_len`` positions. The prompt is read through the same steps (its logits are not used), then each new
token is drawn from the logits of the previous one::

    tokens = linformer_jax.generate(model, variables, prompt, 64, temperature=0.8, top_k=40,
                                    rng=jax.random.key(0))   # (batch, prompt_len + 64)
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import check_int

__all__ = ["generate", "sample_logits"]


def _check_sampling(temperature, top_k, top_p, vocab_size: int) -> None:
  """The sampling arguments, checked before anything is traced."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0.0:
    raise ValueError(f"temperature must be a float >= 0 (0 = greedy: the most likely token), got {temperature!r}.")
  check_int("top_k", top_k, minimum=1, allow_none=True)
  if top_k is not None and top_k > vocab_size:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab_size} tokens); use top_k <= {vocab_size} "
                     "or None.")
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                            or not 0.0 < top_p <= 1.0):
    raise ValueError(f"top_p must be in (0, 1] (the smallest set of tokens whose probability reaches top_p), "
                     f"got {top_p!r}.")


def sample_logits(logits: jax.Array, rng: Optional[jax.Array], *, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
  """One token per row from ``logits``: greedy, or a draw at ``temperature`` restricted by top-k / top-p.

  Args:
    logits: (batch, vocab) float.
    rng: PRNG key (unused when temperature == 0).
    temperature: 0 = the argmax; otherwise the logits are divided by it before the draw.
    top_k: keep only the k most likely tokens (None = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling;
      None = all). The most likely token is always kept.

  Returns:
    (batch,) int32 token ids.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p is not None:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens more likely than each
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("decoder", "total", "temperature", "top_k", "top_p"))
def _generate(decoder: nn.Module, variables, prompt, rng, *, total: int, temperature, top_k, top_p):
  """The jitted loop: step t feeds token t and, past the prompt, writes the draw from its logits at t + 1."""
  batch, prompt_len = prompt.shape
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), prompt[:, :1])["cache"]
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)

  def step(carry, t):
    tokens, cache = carry
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, updates = decoder.apply({**variables, "cache": cache}, token, mutable=["cache"])
    drawn = sample_logits(logits[:, 0], jax.random.fold_in(rng, t), temperature=temperature, top_k=top_k,
                          top_p=top_p)
    keep = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)[:, 0]
    following = jnp.where(t + 1 < prompt_len, keep, drawn)  # inside the prompt: the prompt's token
    return (jax.lax.dynamic_update_slice_in_dim(tokens, following[:, None], t + 1, axis=1),
            updates["cache"]), None

  (tokens, _), _ = jax.lax.scan(step, (tokens, cache), jnp.arange(total - 1))
  return tokens


def generate(model: nn.Module, variables, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             rng: Optional[jax.Array] = None) -> jax.Array:
  """Continues ``prompt`` by ``max_new_tokens`` tokens drawn from a causal language model.

  Args:
    model: a ``LinformerLM`` built with causal=True (Linformer or full attention).
    variables: its variables (``params`` and, for projection="fixed", ``constants``).
    prompt: (batch, prompt_len) int token ids, prompt_len >= 1.
    max_new_tokens: how many tokens to add (>= 1); prompt_len + max_new_tokens <= ``model.max_len``.
    temperature: 0 = greedy (the argmax at every step); otherwise the sampling temperature.
    top_k: sample among the k most likely tokens only (None = all).
    top_p: nucleus sampling: among the smallest set of most likely tokens whose probability reaches top_p.
    rng: PRNG key; required unless temperature == 0.

  Returns:
    (batch, prompt_len + max_new_tokens) int32: the prompt followed by the new tokens.

  Raises:
    ValueError: a model that is not a causal ``LinformerLM``, a prompt of another shape, too long a result,
      ``top_k`` <= 0 or above the vocabulary, ``top_p`` outside (0, 1], a negative temperature, or no ``rng``
      for sampling.
    TypeError: a prompt that is not an integer array.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import linformer_jax
    >>> from linformer_jax.models import LinformerLM
    >>> lm = LinformerLM(vocab_size=32, max_len=16, dim=16, depth=1, num_heads=2, k=4, causal=True)
    >>> variables = lm.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    >>> out = linformer_jax.generate(lm, variables, jnp.array([[1, 2, 3]]), 5, temperature=0.0)
    >>> out.shape, out[0, :3].tolist()
    ((1, 8), [1, 2, 3])
  """
  from linformer_jax.models.linformer import LinformerLM  # pylint: disable=import-outside-toplevel
  if not isinstance(model, LinformerLM) or not model.causal:
    raise ValueError(f"generate needs a LinformerLM built with causal=True (each position sees only earlier "
                     f"tokens); got {type(model).__name__}"
                     + (" with causal=False" if isinstance(model, LinformerLM) else "") + ".")
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must have shape (batch, prompt_len) with prompt_len >= 1, got {prompt.shape}.")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}.")
  check_int("max_new_tokens", max_new_tokens, minimum=1)
  total = prompt.shape[1] + max_new_tokens
  if total > model.max_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
                     f"model's max_len={model.max_len} (its positions and projections end there).")
  _check_sampling(temperature, top_k, top_p, model.vocab_size)
  if temperature != 0.0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...); use temperature=0.0 for greedy "
                     "decoding without one.")
  decoder = model.clone(decoding=True, parent=None)  # apply runs deterministic: no dropout
  rng = jax.random.key(0) if rng is None else rng
  return _generate(decoder, variables, prompt.astype(jnp.int32), rng, total=total, temperature=float(temperature),
                   top_k=top_k, top_p=None if top_p is None else float(top_p))
