"""Screenshots of the built documentation site, as a reader sees it, in headless Chromium (``make docs-screenshots``).

Usage: ``python docs/screenshots.py HTML_DIR OUT_DIR`` after ``make docs``; writes ``OUT_DIR/index.png`` (the front
page) and ``OUT_DIR/api_models.png`` (the API page of ``linformer_jax.models``). Needs a Chromium binary (Debian:
``apt-get install chromium``; another one through the ``CHROMIUM`` environment variable). Not part of CI.
"""
import os
import pathlib
import shutil
import subprocess
import sys

PAGES = {"index.png": "index.html", "api_models.png": "_autosummary/linformer_jax.models.html"}
WINDOW = "1400,1000"


def chromium() -> str:
  """The Chromium binary: ``$CHROMIUM``, else the first of chromium/chromium-browser/google-chrome on PATH."""
  for name in [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]:
    if name and shutil.which(name):
      return shutil.which(name)
  raise SystemExit("error: no Chromium found; install it (apt-get install chromium) or set CHROMIUM=/path/to/it")


def screenshot(browser: str, page: pathlib.Path, out: pathlib.Path) -> None:
  """Renders ``page`` (a local HTML file) at ``WINDOW`` pixels into the PNG ``out``."""
  if not page.is_file():
    raise SystemExit(f"error: {page} does not exist; run `make docs` first")
  subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--window-size={WINDOW}", f"--screenshot={out}", page.resolve().as_uri()],
                 check=True, capture_output=True, timeout=120)
  print(f"{out}: {page}")


def main(argv: list[str]) -> None:
  """Takes every screenshot of ``PAGES``."""
  if len(argv) != 3:
    raise SystemExit(__doc__)
  html, out = pathlib.Path(argv[1]), pathlib.Path(argv[2])
  out.mkdir(parents=True, exist_ok=True)
  browser = chromium()
  for name, page in PAGES.items():
    screenshot(browser, html / page, out / name)


if __name__ == "__main__":
  main(sys.argv)
