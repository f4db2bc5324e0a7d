"""The README's Python snippets run, in order, as a newcomer would paste them; it stays a landing page."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README should carry the API example and a reward with feedback"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed: {exc!r}\n{block}") from exc


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make quickstart" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "make docs" in ci


def test_readme_is_a_landing_page_that_links_into_the_docs():
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= 220, f"README.md has {lines} lines: move the manual's content to docs/"
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (README.parent / page).exists(), page
