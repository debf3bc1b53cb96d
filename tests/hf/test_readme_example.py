"""The README's PEER-in-transformers example runs as written (in a temporary working folder)."""

import os
import runpy


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(os.path.join(os.path.dirname(__file__), "readme_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "tensor([[" in out
    with open(tmp_path / "peer-llama" / "config.json") as fh:
        assert '"peer"' in fh.read()


def test_readme_holds_the_example_verbatim():
    here = os.path.dirname(__file__)
    with open(os.path.join(here, "readme_example.py")) as fh:
        body = fh.read().split("\n", 1)[1]  # after the comment line naming the file's purpose
    with open(os.path.join(here, "..", "..", "README.md")) as fh:
        assert "```py\n" + body + "```" in fh.read()
