"""LinformerLM, LinformerClassifier, LinformerEncDec: shapes, composition against numpy, gradients, a few
optax.adam steps, padding invariance, decoder causality, shift_right."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linformer_jax.models import Linformer, LinformerClassifier, LinformerEncDec, LinformerLM, shift_right
from helpers import np_init, rand

ATOL = 1e-5
VOCAB, NUM_CLASSES = 13, 3
CFG = dict(max_len=12, dim=8, depth=2, num_heads=2, k=5, dim_ff=16)
# pool="cls" prepends a token: max_len 11 keeps the encoder at the same shapes (12) as the other tests
CLS_CFG = dict(CFG, max_len=11)
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def tokens(seed, shape, vocab=VOCAB):
  return jnp.asarray(np.random.RandomState(seed).randint(1, vocab, shape), jnp.int32)


def f64(a):
  return np.asarray(a, np.float64)


np_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1.0 + np_erf(x / math.sqrt(2.0)))


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_sinusoid(n, dim, base=10000.0):
  angles = np.arange(n)[:, None] / base ** (np.arange(0, dim, 2) / dim)[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], -1)


def xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))


def check_grads_and_adam(loss_fn, params, steps=8, lr=1e-2):
  """jax.grad of the loss is finite and non-zero for every parameter leaf, and `steps` optax.adam steps on the
  one batch lower the loss by more than 10 %. One jitted step (eager grads compile op by op: much slower)."""
  opt = optax.adam(lr)

  # no backend optimisation: halves the XLA compile time on CPU, which dominates these tiny steps
  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grads

  state = opt.init(params)
  losses = []
  for i in range(steps + 1):  # the last call only evaluates the loss after `steps` updates
    new_params, state, loss, grads = step(params, state)
    if i == 0:
      flat = jax.tree_util.tree_flatten_with_path(grads)[0]
      assert jax.tree.structure(grads) == jax.tree.structure(params) and flat
      for path, g in flat:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
    losses.append(float(loss))
    params = new_params
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------
# LinformerLM
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_emb,tie", [("learned", False), ("sinusoidal", True)])
def test_lm_shapes_and_composition(pos_emb, tie):
  lm = LinformerLM(**CFG, vocab_size=VOCAB, pos_emb=pos_emb, tie_embeddings=tie)
  tok = tokens(0, (2, 9))
  variables = np_init(lm, tok)
  logits = np.asarray(lm.apply(variables, tok))
  assert logits.shape == (2, 9, VOCAB)
  p = variables["params"]
  assert ("head" in p) == (not tie)
  # numpy embedding → (the encoder module on those vectors) → numpy head
  table = f64(p["embed"]["token"]["embedding"])
  pos = f64(p["embed"]["position"])[:9] if pos_emb == "learned" else np_sinusoid(9, 8)
  x = table[np.asarray(tok)] + pos[None]
  h = f64(Linformer(**CFG).apply({"params": p["encoder"]}, jnp.asarray(x, jnp.float32)))
  want = h @ table.T if tie else h @ f64(p["head"]["kernel"]) + f64(p["head"]["bias"])
  np.testing.assert_allclose(logits, want, atol=ATOL)


def test_lm_grads_and_adam():
  lm = LinformerLM(**dict(CFG, sharing="headwise", depth=1), vocab_size=VOCAB)
  tok = tokens(1, (2, 12))
  labels = tokens(2, (2, 12))
  variables = np_init(lm, tok)
  loss_fn = lambda params: xent(lm.apply({"params": params}, tok), labels)
  check_grads_and_adam(loss_fn, variables["params"])


def test_lm_mask_invariance():
  lm = LinformerLM(**CFG, vocab_size=VOCAB)
  lengths = np.array([7, 4])
  real = np.asarray(tokens(3, (2, 12)))
  inputs = []
  for n, seed in ((9, 4), (9, 5), (12, 6)):
    tok = np.array(tokens(seed, (2, n)))
    for bi, length in enumerate(lengths):
      tok[bi, :length] = real[bi, :length]
    inputs.append((jnp.asarray(tok), jnp.asarray(np.arange(n)[None] < lengths[:, None])))
  variables = np_init(lm, *inputs[2])
  outs = [np.asarray(lm.apply(variables, t, mask=m)) for t, m in inputs]
  for out in outs[1:]:
    for bi, length in enumerate(lengths):
      np.testing.assert_allclose(out[bi, :length], outs[0][bi, :length], atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# LinformerClassifier
# ----------------------------------------------------------------------------------------------------------
def _classifier_inputs(vocab, seed, n=9):
  return tokens(seed, (2, n)) if vocab else rand(seed, (2, n, 8))


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("vocab", [VOCAB, None])
def test_classifier_shapes_and_pooling(pool, vocab):
  cfg = CLS_CFG if pool == "cls" else CFG
  n = 8 if pool == "cls" else 9
  clf = LinformerClassifier(**cfg, num_classes=NUM_CLASSES, vocab_size=vocab, pool=pool, mlp_dim=6)
  inputs = _classifier_inputs(vocab, 7, n)
  mask = jnp.asarray(np.arange(n)[None] < np.array([[6], [n]]))
  variables = np_init(clf, inputs, mask=mask)
  logits = np.asarray(clf.apply(variables, inputs, mask=mask))
  assert logits.shape == (2, NUM_CLASSES)
  p = variables["params"]
  assert ("embed" in p) == (vocab is not None)
  assert ("cls" in p) == (pool == "cls")
  # independent pooling + head on top of the encoder module
  if vocab:
    x = f64(p["embed"]["token"]["embedding"])[np.asarray(inputs)] + f64(p["embed"]["position"])[:n][None]
  else:
    x = f64(inputs)
  m = np.asarray(mask)
  if pool == "cls":
    x = np.concatenate([np.broadcast_to(f64(p["cls"]).reshape(1, 1, 8), (2, 1, 8)), x], 1)
    m = np.concatenate([np.ones((2, 1), bool), m], 1)
    enc = Linformer(**dict(CFG, max_len=12))  # built for max_len + 1
  else:
    enc = Linformer(**CFG)
  h = f64(enc.apply({"params": p["encoder"]}, jnp.asarray(x, jnp.float32), mask=jnp.asarray(m)))
  pooled = h[:, 0] if pool == "cls" else (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  hidden = np_gelu(pooled @ f64(p["pre_logits"]["kernel"]) + f64(p["pre_logits"]["bias"]))
  want = hidden @ f64(p["head"]["kernel"]) + f64(p["head"]["bias"])
  np.testing.assert_allclose(logits, want, atol=ATOL)


def test_classifier_grads_and_adam():
  clf = LinformerClassifier(**dict(CLS_CFG, sharing="kv", depth=1), num_classes=NUM_CLASSES, vocab_size=VOCAB,
                            pool="cls")
  inputs = _classifier_inputs(VOCAB, 8, n=11)
  labels = jnp.array([0, 2])
  variables = np_init(clf, inputs)
  loss_fn = lambda params: xent(clf.apply({"params": params}, inputs), labels)
  check_grads_and_adam(loss_fn, variables["params"])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_mask_invariance(pool):
  """7 and 4 real tokens in sequences of length 9, 9 (other padding) and 12 = max_len (for pool="cls":
  8, 8, 11 = max_len, so that with the CLS token the encoder sees 9 and 12 positions)."""
  cfg, short, long = (CLS_CFG, 8, 11) if pool == "cls" else (CFG, 9, 12)
  clf = LinformerClassifier(**cfg, num_classes=NUM_CLASSES, vocab_size=None, pool=pool)
  lengths = np.array([7, 4])
  real = np.asarray(rand(10, (2, 12, 8)))
  inputs = []
  for n, seed in ((short, 11), (short, 12), (long, 13)):
    x = np.array(rand(seed, (2, n, 8), 3.0))
    for bi, length in enumerate(lengths):
      x[bi, :length] = real[bi, :length]
    inputs.append((jnp.asarray(x), jnp.asarray(np.arange(n)[None] < lengths[:, None])))
  variables = np_init(clf, *inputs[2])
  outs = [np.asarray(clf.apply(variables, x, mask=m)) for x, m in inputs]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=ATOL)
  # control: the unmasked classifier does see the padding
  assert np.abs(np.asarray(clf.apply(variables, inputs[0][0])) - np.asarray(
      clf.apply(variables, inputs[1][0]))).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# LinformerEncDec
# ----------------------------------------------------------------------------------------------------------
ENCDEC = dict(CFG, depth=1, vocab_size=VOCAB, target_vocab_size=11, max_target_len=10, decoder_depth=2)


def test_shift_right():
  t = jnp.array([[5, 6, 7, 8], [1, 2, 3, 4]])
  np.testing.assert_array_equal(shift_right(t), [[0, 5, 6, 7], [0, 1, 2, 3]])
  np.testing.assert_array_equal(shift_right(t, bos_id=9), [[9, 5, 6, 7], [9, 1, 2, 3]])
  long = np.random.RandomState(0).randint(0, 50, (3, 6))
  want = np.concatenate([np.full((3, 1), 2), long[:, :-1]], 1)
  np.testing.assert_array_equal(shift_right(jnp.asarray(long), 2), want)


def test_encdec_shapes_causality_and_source_padding():
  model = LinformerEncDec(**ENCDEC)
  src, tgt = tokens(20, (2, 12)), tokens(21, (2, 9), 11)
  src_mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [6]]))
  variables = np_init(model, src, tgt, src_mask=src_mask)
  p = variables["params"]
  assert {"src_embed", "tgt_embed", "encoder", "decoder_layers_0", "decoder_layers_1", "logits"} <= set(p)
  assert p["decoder_layers_0"]["cross_attention"]["E"]["kernel"].shape == (2, 12, 5)  # source max_len
  tgt_in = shift_right(tgt)
  logits = np.asarray(model.apply(variables, src, tgt_in, src_mask=src_mask))
  assert logits.shape == (2, 9, 11)
  # decoder causality: changing target token j changes positions >= j (at least j), never < j
  for j in (0, 3, 8):
    changed = tgt_in.at[:, j].set((tgt_in[:, j] + 1) % 11)
    out = np.asarray(model.apply(variables, src, changed, src_mask=src_mask))
    np.testing.assert_allclose(out[:, :j], logits[:, :j], atol=ATOL)
    assert np.abs(out[:, j] - logits[:, j]).max() > 1e-4
  # source padding: changing padded source tokens (sequence 1, positions 6..11) changes nothing
  src2 = src.at[1, 6:].set((src[1, 6:] + 3) % VOCAB)
  out = np.asarray(model.apply(variables, src2, tgt_in, src_mask=src_mask))
  np.testing.assert_allclose(out, logits, atol=ATOL)
  # ... while a real source token does change the logits (decoder attends to the encoder output)
  src3 = src.at[1, 2].set((src[1, 2] + 3) % VOCAB)
  out = np.asarray(model.apply(variables, src3, tgt_in, src_mask=src_mask))
  assert np.abs(out[1] - logits[1]).max() > 1e-4
  np.testing.assert_allclose(out[0], logits[0], atol=ATOL)
  # encode / decode split equals the call
  enc = model.apply(variables, src, src_mask, method=LinformerEncDec.encode)
  dec = model.apply(variables, enc, tgt_in, src_mask, method=LinformerEncDec.decode)
  np.testing.assert_allclose(dec, logits, atol=ATOL)


def test_encdec_target_padding_mask():
  model = LinformerEncDec(**ENCDEC)
  src, tgt_in = tokens(22, (2, 12)), tokens(23, (2, 9), 11)
  tgt_mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [5]]))
  variables = np_init(model, src, tgt_in, tgt_mask=tgt_mask)
  a = np.asarray(model.apply(variables, src, tgt_in, tgt_mask=tgt_mask))
  b = np.asarray(model.apply(variables, src, tgt_in.at[1, 5:].set(1), tgt_mask=tgt_mask))
  np.testing.assert_allclose(b[1, :5], a[1, :5], atol=ATOL)


def test_encdec_grads_and_adam():
  model = LinformerEncDec(**dict(ENCDEC, sharing="layerwise", decoder_depth=1))
  src, tgt = tokens(24, (2, 12)), tokens(25, (2, 9), 11)
  variables = np_init(model, src, shift_right(tgt))
  assert "decoder_EF" in variables["params"] and "EF" in variables["params"]["encoder"]
  loss_fn = lambda params: xent(model.apply({"params": params}, src, shift_right(tgt)), tgt)
  check_grads_and_adam(loss_fn, variables["params"])


def test_encdec_with_causal_linformer_decoder_self_attention():
  model = LinformerEncDec(**dict(ENCDEC, max_target_len=10), decoder_self_attention="linformer")
  src, tgt_in = tokens(30, (2, 12)), shift_right(tokens(31, (2, 10), 11))
  variables = np_init(model, src, tgt_in)
  attention = variables["params"]["decoder_layers_0"]["self_attention"]
  assert attention["E"]["kernel"].shape[-2:] == (10, 5)  # the target's 10 positions projected to k = 5
  logits = np.asarray(model.apply(variables, src, tgt_in))
  # exact causality: changing target token j leaves every earlier position bit-for-bit unchanged
  for j in (0, 4, 9):
    changed = tgt_in.at[:, j].set((tgt_in[:, j] + 1) % 11)
    out = np.asarray(model.apply(variables, src, changed))
    np.testing.assert_array_equal(out[:, :j], logits[:, :j])
    assert np.abs(out[:, j] - logits[:, j]).max() > 1e-4
  with pytest.raises(ValueError, match="k must be <= 4"):
    LinformerEncDec(**dict(ENCDEC, max_target_len=4), decoder_self_attention="linformer")
  with pytest.raises(ValueError, match="sharing 'none', 'headwise' or 'kv'"):
    LinformerEncDec(**dict(ENCDEC, sharing="layerwise"), decoder_self_attention="linformer")
