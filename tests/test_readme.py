"""The README's example runs as written, and the README starts with exactly two commands."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_two_commands():
  text = README.read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S)
  assert first_block is not None and text.index("```bash") < text.index("\n## ")
  commands = [line for line in first_block.group(1).splitlines() if line.strip()]
  assert [c.split("#")[0].strip() for c in commands] == ["make train", "make test"]


def test_readme_example_runs():
  text = README.read_text()
  example = text.split("### Example", 1)[1]
  code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
  namespace = {}
  exec(compile(code, "README-example", "exec"), namespace)  # the example's own asserts must hold
  assert namespace["y"].shape == (2, 700, 128)


def test_readme_xcit_example_runs():
  text = README.read_text()
  code = re.search(r"```python\n(.*?)```", text.split("## XCiT", 1)[1], re.S).group(1)
  namespace = {}
  exec(compile(code, "README-xcit-example", "exec"), namespace)
  assert namespace["logits"].shape == (2, 1000)
  assert namespace["tokens"].shape == (2, 1 + 14 * 20, 128)
  assert namespace["new_variables"]["params"]["head"]["kernel"].shape == (128, 10)
