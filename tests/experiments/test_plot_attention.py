"""experiments.plot_attention: writes the three PNGs (valid, readable, non-empty); image loading; checkpoints."""
import os

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from experiments import plot_attention as pa
from linformer_jax.models import create_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("cls_attention", "xca_attention", "linformer_attention")


def check_pngs(out_dir, result):
  for name in NAMES:
    path = os.path.join(out_dir, f"{name}.png")
    assert result["paths"][name] == path
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.01  # something was drawn


def test_main_writes_three_pngs(tmp_path, capsys):
  out = str(tmp_path / "maps")
  result = pa.main(["--out", out, "--size", "64", "--quick"])
  check_pngs(out, result)
  printed = capsys.readouterr().out.split()
  assert printed == [os.path.join(out, f"{n}.png") for n in NAMES]
  assert result["grid"] == (4, 4) and result["source"] == "random"
  assert result["logits"].shape == (1000,) and np.isfinite(result["logits"]).all()


def test_png_image_and_checkpoint(tmp_path):
  import orbax.checkpoint as ocp

  size = 64
  # a PNG written here is read back (alpha dropped) equal to the source to 8-bit precision
  src = pa.synthetic_image(size, seed=3)
  png = str(tmp_path / "img.png")
  mpimg.imsave(png, src)
  np.testing.assert_allclose(pa.load_image(png, size), src, atol=1.5 / 255)
  np.save(str(tmp_path / "img.npy"), src)
  np.testing.assert_allclose(pa.load_image(str(tmp_path / "img.npy"), size), src, atol=1e-6)

  model = create_model("xcit_nano_12_p16_224", depth=pa.QUICK_DEPTH)
  variables = pa.random_variables(model, jnp.zeros((1, size, size, 3)), seed=7)
  ckpt = str(tmp_path / "ckpt")
  ocp.PyTreeCheckpointer().save(ckpt, variables)
  out = str(tmp_path / "maps")
  result = pa.main(["--out", out, "--size", str(size), "--quick", "--image", png, "--checkpoint", ckpt])
  check_pngs(out, result)
  assert result["source"].startswith("checkpoint")
  x = (pa.load_image(png, size) - pa.IMAGENET_MEAN) / pa.IMAGENET_STD
  want = np.asarray(pa._sown_forward(model)(variables, jnp.asarray(x[None], jnp.float32))[0][0])
  np.testing.assert_allclose(result["logits"], want, rtol=1e-4, atol=1e-4)


def test_maps_are_probabilities():
  model = create_model("xcit_nano_12_p16_224", depth=pa.QUICK_DEPTH)
  img = pa.synthetic_image(64)
  assert img.shape == (64, 64, 3) and img.min() >= 0 and img.max() <= 1
  maps = pa.xcit_maps(model, pa.random_variables(model, jnp.zeros((1, 64, 64, 3)), 0, model.eta), img)
  assert [m.shape for m in maps["xca"]] == [(4, 32, 32)] * pa.QUICK_DEPTH
  assert [m.shape for m in maps["cls"]] == [(4, 17)] * 2
  for m in maps["xca"] + maps["cls"]:
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
  lin = pa.linformer_maps(0)
  assert lin.shape == (2, 4, 64, 16)
  np.testing.assert_allclose(lin.sum(-1), 1.0, atol=1e-5)


def test_bad_size_is_a_usage_error(tmp_path):
  with pytest.raises(SystemExit):
    pa.main(["--out", str(tmp_path), "--size", "72"])
  with pytest.raises(SystemExit):
    pa.main(["--out", str(tmp_path), "--model", "vit_tiny_patch16_224"])
