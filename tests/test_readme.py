"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for code in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(code, str(README), "exec"), namespace)
    assert tuple(namespace["y"].shape) == (4, 32, 256)
    assert tuple(namespace["indices"].shape) == (4, 32, 8, 16)


def test_ci_runs_the_readme_test_command():
    cmd = re.search(r"Tests.*?```bash\n(.*?)\n```", README.read_text(), flags=re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmd in ci
