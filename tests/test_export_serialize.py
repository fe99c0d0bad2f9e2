"""`jax.export(...).serialize()` works with the declared dependencies (it needs the `flatbuffers` package)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from linformer_jax.models import create_model


def test_exported_linformer_lm_serializes_and_round_trips():
  model = create_model("linformer_lm", vocab_size=11, max_len=8, dim=16, depth=1, num_heads=2, k=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  exported = export.export(jax.jit(lambda v, t: model.apply(v, t)))(variables, tokens)
  blob = exported.serialize()
  assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
  restored = export.deserialize(blob)
  np.testing.assert_allclose(np.asarray(restored.call(variables, tokens)),
                             np.asarray(model.apply(variables, tokens)), rtol=1e-5, atol=1e-6)
