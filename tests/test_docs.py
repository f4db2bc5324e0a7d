"""The documentation site (docs/, mkdocs.yml) cannot drift from the code it describes.

`make docs` builds it strictly (broken links and anchors fail); these tests need no mkdocs.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import sdpo
from sdpo.config import SECTIONS, SDPOConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))


def _config_reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_page_is_generated_from_the_current_dataclasses():
    ref = _config_reference()
    assert ref.PAGE.read_text() == ref.render(), (
        "docs/configuration-reference.md is stale: run `python scripts/config_reference.py`"
    )


def test_every_config_key_has_a_doc_and_a_row_in_the_reference():
    ref = _config_reference()
    assert ref.undocumented() == []
    page = ref.PAGE.read_text()
    for key in SDPOConfig.keys():
        doc = SDPOConfig.field_info(key)[0].metadata["doc"]
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} has no row in the configuration reference"
        assert ref._cell(doc) in row, key


def test_reference_rows_carry_type_default_choices_and_resumability():
    page = _config_reference().render()
    row = next(
        line for line in page.splitlines() if line.startswith("| `self_distillation.is_clip`")
    )
    assert "`float | None`" in row and "`2.0`" in row and "Bounds: > 0.0" in row
    row = next(line for line in page.splitlines() if line.startswith("| `generation.backend`"))
    assert "One of `hf`, `vllm`" in row
    row = next(
        line for line in page.splitlines() if line.startswith("| `optimization.learning_rate`")
    )
    assert "May change on resume" in row
    assert "| `paper` |" in page and "`policy_gradient.pg_loss_weight=0.0`" in page


def test_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    ref = _config_reference()
    stale = tmp_path / "configuration-reference.md"
    stale.write_text(ref.render().replace("Rollouts per prompt G", "Rollouts per prompt"))
    monkeypatch.setattr(ref, "PAGE", stale)
    assert ref.main(["--check"]) == 1
    stale.write_text(ref.render())
    assert ref.main(["--check"]) == 0


def test_undocumented_key_is_reported(monkeypatch):
    ref = _config_reference()
    fld = next(f for f in SECTIONS["run"].__dataclass_fields__.values() if f.name == "seed")
    monkeypatch.setattr(fld, "metadata", {**fld.metadata, "doc": ""})
    assert "run.seed" in ref.undocumented()
    assert ref.main(["--check"]) == 1


_SECTION = "|".join(SECTIONS)
_KEY = re.compile(rf"`((?:{_SECTION})\.[a-z_0-9]+(?:\.[a-z_0-9]+)?)")


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_docs_name_only_config_keys_that_exist(page):
    keys = SDPOConfig.keys()
    valid = set(keys) | {k.rsplit(".", 1)[0] for k in keys}  # sub-sections: `model.lora`
    named = set(_KEY.findall(page.read_text()))
    unknown = sorted(k for k in named if k not in valid)
    assert not unknown, f"{page.relative_to(ROOT)} names config keys that do not exist: {unknown}"


_README_BLOCKS = set(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S))


# A block that cannot run here (it needs the hub, a GPU, a launcher) says so on the line before it:
# <!-- not run: needs a model from the hub -->
_BLOCK = re.compile(r"(<!-- not run: ([^>]*?) -->\n)?```python\n(.*?)```", flags=re.S)


def _blocks(page: Path) -> list[str]:
    """A page's runnable Python blocks: not those marked ``not run``, nor those copied from
    README.md (test_readme runs them: one training run of the API example instead of two)."""
    blocks = []
    for marker, reason, block in _BLOCK.findall(page.read_text()):
        assert not marker or reason.strip(), f"{page.name}: say why a block is not run"
        if not marker and block not in _README_BLOCKS:
            blocks.append(block)
    return blocks


def _snippet_pages() -> list[Path]:
    return [page for page in PAGES if _blocks(page)]


@pytest.mark.parametrize("page", _snippet_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_python_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(_blocks(page)):
        try:
            exec(compile(block, f"{page.name}[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name} python block {i} failed: {exc!r}\n{block}") from exc


def test_snippet_pages_include_the_api_tour():
    names = {p.name for p in _snippet_pages()}
    assert {"rewards.md", "python-api.md"} <= names


def _nav_pages(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_pages(v) for v in nav.values()))
    return set().union(*(_nav_pages(v) for v in nav))


def test_every_page_is_in_the_nav_or_linked():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = _nav_pages(config["nav"])
    listed |= {line.strip().lstrip("/") for line in config.get("not_in_nav", "").splitlines()}
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert not sorted(pages - listed), "docs pages missing from mkdocs.yml's nav"
    assert not sorted(listed - pages), "mkdocs.yml's nav names pages that do not exist"


def test_every_public_module_has_an_api_reference():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    modules = {"sdpo"} | {
        m.name
        for m in pkgutil.walk_packages(sdpo.__path__, "sdpo.")
        if not any(part.startswith("_") for part in m.name.split("."))
    }
    missing = sorted(modules - documented)
    assert not missing, f"modules without an API page (add `::: name` under docs/api/): {missing}"


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_user_docs_do_not_talk_about_the_build_environment(page):
    text = page.read_text().lower()
    for phrase in ("was lent", "2-core box", "this box", "no gpu was"):
        assert phrase not in text, f"{page.relative_to(ROOT)}: {phrase!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_lists_and_tables_start_after_a_blank_line(page):
    """GitHub renders a list or table glued to the paragraph above it; Python-Markdown (mkdocs)
    prints it as text, so a README section moved here would silently lose its list."""
    lines, fenced = page.read_text().split("\n"), False
    for i, line in enumerate(lines[1:], start=1):
        fenced ^= line.startswith("```")
        before = lines[i - 1]
        if fenced or not before.strip() or before.startswith(("|", "<!--", " ", "- ")):
            continue
        starts_block = re.match(r"(- |\d+\. |\|)", line)
        assert not starts_block, f"{page.name}:{i + 1}: add a blank line before {line[:40]!r}"


def test_docstring_roles_render_as_code():
    spec = importlib.util.spec_from_file_location("hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = (
        "see :func:<code>policy_terms</code> and "
        ":class:<code>~sdpo.generation.GenerationBackend</code>; :meth:<code>a.b</code>"
    )
    assert hooks.on_page_content(html) == (
        "see <code>policy_terms</code> and <code>GenerationBackend</code>; <code>a.b</code>"
    )
    assert "hooks.py" in (ROOT / "mkdocs.yml").read_text()
