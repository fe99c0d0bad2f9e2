"""Decoding one token at a time (``decoding=True``) and ``linformer_jax.generate``: every step's logits equal the
full-sequence forward, greedy generation is the argmax of that forward at every step, the causal Linformer's state
does not grow with the context, sampling draws from the distribution numpy computes, bad arguments raise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import linformer_jax
from linformer_jax.decoding import sample_logits
from linformer_jax.layers import FullSelfAttention
from linformer_jax.models import Linformer, LinformerLM

VOCAB = 13
LM = dict(vocab_size=VOCAB, max_len=24, dim=16, depth=2, num_heads=2, k=6, dim_ff=32, causal=True, causal_chunk=5)
DECODERS = {
    "linformer, none": dict(),
    "linformer, kv, fixed, scan": dict(sharing="kv", projection="fixed", scan_layers=True),
    "linformer, layerwise, bias, post-LN, tied": dict(sharing="layerwise", projection_bias=True, norm="post",
                                                      tie_embeddings=True),
    "linformer, headwise, sinusoidal, C2": dict(sharing="headwise", pos_emb="sinusoidal", remat="C2"),
    "linformer, k per layer": dict(k_reduce_by_layer=2),
    "full attention": dict(attention="full"),
    "full attention, scan": dict(attention="full", scan_layers=True),
}


def _model_and_variables(overrides, seed=0):
  model = LinformerLM(**LM, **overrides)
  variables = model.init(jax.random.key(seed), jnp.zeros((2, LM["max_len"]), jnp.int32))
  # non-zero biases (zeros at init) so that the decoding of each bias is tested too
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.2 if "bias" in jax.tree_util.keystr(path) else a, variables)
  return model, variables


def _empty_cache(decoder, tokens):
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens[:, :1])["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("case", list(DECODERS))
def test_decoding_step_by_step_equals_the_full_forward(case):
  model, variables = _model_and_variables(DECODERS[case])
  tokens = jax.random.randint(jax.random.key(1), (2, LM["max_len"]), 0, VOCAB)
  decoder = model.clone(decoding=True)
  step = jax.jit(lambda cache, token: decoder.apply({**variables, "cache": cache}, token, mutable=["cache"]))
  cache, logits = _empty_cache(decoder, tokens), []
  for t in range(tokens.shape[1]):
    out, updates = step(cache, tokens[:, t:t + 1])
    cache = updates["cache"]
    logits.append(np.asarray(out[:, 0]))
  np.testing.assert_allclose(np.stack(logits, 1), np.asarray(model.apply(variables, tokens)), atol=2e-5)


@pytest.mark.parametrize("attention", ["linformer", "full"])
def test_greedy_generation_is_the_argmax_of_the_full_forward(attention):
  model, variables = _model_and_variables(dict(attention=attention))
  prompt = jax.random.randint(jax.random.key(2), (3, 5), 0, VOCAB)
  out = np.asarray(linformer_jax.generate(model, variables, prompt, 19, temperature=0.0))
  assert out.shape == (3, 24) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, :5], np.asarray(prompt))
  logits = np.asarray(model.apply(variables, jnp.asarray(out)))
  np.testing.assert_array_equal(out[:, 5:], logits[:, 4:-1].argmax(-1))  # token t+1 = argmax of position t


def test_linformer_state_is_constant_in_the_context_length_and_the_kv_cache_is_not():
  def cache_bytes(max_len, attention):
    model = LinformerLM(**dict(LM, max_len=max_len, attention=attention), decoding=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["cache"]
    return sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(shapes))
  depth, heads, k, head_dim = LM["depth"], LM["num_heads"], LM["k"], LM["dim"] // LM["num_heads"]
  # per layer: two float32 (batch 1, heads, k, head_dim) sums, a (heads, k) bool, an int32 index; plus the position
  expected = depth * (2 * heads * k * head_dim * 4 + heads * k + 4) + 4
  assert cache_bytes(64, "linformer") == cache_bytes(4096, "linformer") == expected
  assert cache_bytes(4096, "full") == 64 * cache_bytes(64, "full") - 63 * (depth * 4 + 4)  # keys/values grow with n


def test_sampling_draws_from_the_restricted_distribution():
  logits = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  probs = np.exp(np.asarray(logits[0], np.float64) / 0.7)
  probs /= probs.sum()
  draw = jax.jit(jax.vmap(lambda key, **kw: sample_logits(logits, key, temperature=0.7)[0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 20000))), minlength=6) / 20000
  np.testing.assert_allclose(counts, probs, atol=0.015)
  keys = jax.random.split(jax.random.key(1), 4000)
  top_k = np.asarray(jax.vmap(lambda key: sample_logits(logits, key, top_k=2)[0])(keys))
  assert set(top_k.tolist()) == {0, 1}
  # nucleus: sorted probabilities at temperature 1; keep the tokens whose predecessors sum below top_p
  p1 = np.exp(np.asarray(logits[0], np.float64))
  p1 /= p1.sum()
  nucleus = {i for i in range(6) if p1[:i].sum() < 0.9}
  top_p = np.asarray(jax.vmap(lambda key: sample_logits(logits, key, top_p=0.9)[0])(keys))
  assert set(top_p.tolist()) == nucleus and len(nucleus) < 6
  assert int(sample_logits(logits, None, temperature=0.0)[0]) == 0


def test_bad_generation_arguments_raise_before_tracing():
  model, variables = _model_and_variables({})
  prompt = jnp.zeros((1, 4), jnp.int32)
  cases = [
      (dict(model=model.clone(causal=False)), ValueError, "causal=True"),
      (dict(max_new_tokens=21), ValueError, "exceeds the model's max_len=24"),
      (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
      (dict(top_k=0), ValueError, "top_k"),
      (dict(top_k=VOCAB + 1), ValueError, "top_k=14 exceeds the vocabulary"),
      (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
      (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
      (dict(temperature=-1.0), ValueError, "temperature"),
      (dict(temperature=1.0, rng=None), ValueError, "needs rng"),
      (dict(prompt=jnp.zeros((1, 4))), TypeError, "integer token ids"),
      (dict(prompt=jnp.zeros((4,), jnp.int32)), ValueError, "prompt must have shape"),
  ]
  for overrides, exc, match in cases:
    kwargs = {**dict(model=model, variables=variables, prompt=prompt, max_new_tokens=3, temperature=0.0),
              **overrides}
    with pytest.raises(exc, match=match):
      linformer_jax.generate(kwargs.pop("model"), kwargs.pop("variables"), kwargs.pop("prompt"),
                             kwargs.pop("max_new_tokens"), **kwargs)
  with pytest.raises(ValueError, match="decoding=True .* needs causal=True"):
    Linformer(max_len=8, dim=8, depth=1, num_heads=2, k=4, decoding=True)
  with pytest.raises(ValueError, match="max_len"):
    FullSelfAttention(num_heads=2, causal=True, decoding=True)
  decoder = model.clone(decoding=True)
  with pytest.raises(ValueError, match="one position per call"):
    decoder.init(jax.random.key(0), prompt)
