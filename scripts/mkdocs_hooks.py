"""mkdocs hooks (mkdocs.yml `hooks:`): render the Sphinx roles sdpo's docstrings use as code.

Docstrings write ``:func:`policy_terms``` or ``:class:`~sdpo.generation.GenerationBackend```;
mkdocstrings renders Markdown, so the role would show as ``:func:`` text before the name. Here it
becomes just the name in code (a leading ``~`` keeps the last dotted part, as Sphinx does).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):<code>(~?)([^<]*)</code>"
)


def _name(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_name, html)
