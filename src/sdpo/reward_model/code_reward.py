"""A rule-based code reward: the longest fenced Python block must parse and define the required
function (no execution; :mod:`sdpo.environments.code` runs tests in a sandbox)."""

from __future__ import annotations

import ast
import re
from typing import Any

from sdpo.reward_model.interface import (
    Prompt,
    RewardModel,
    RewardOutput,
    _column,
    _text,
)

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The longest fenced code block tagged ``python``/``py`` or untagged; an unclosed last block counts."""
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    return max(blocks, key=len) if blocks else None


class RuleBasedCodeRewardModel(RewardModel):
    """1.0 when the completion holds a fenced Python block that parses and defines the required function.

    Checks, in order (the first failure gives score 0 and its feedback):
    1. a fenced code block exists (:func:`extract_code`);
    2. ``ast.parse`` accepts it (feedback names the line number and the error);
    3. a ``def`` with the required name exists (anywhere in the module), where the name is
       ``require_function`` if given, else the row's ``function_name_column`` value if the column
       is present (no requirement otherwise).
    """

    name = "code"

    def __init__(
        self, function_name_column: str = "function_name", require_function: str | None = None
    ) -> None:
        self.function_name_column = function_name_column
        self.require_function = require_function

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        n = len(completions)
        if self.require_function is not None:
            required: list[Any] = [self.require_function] * n
        elif self.function_name_column in columns:
            required = _column(type(self).__name__, columns, [self.function_name_column], n)
        else:
            required = [None] * n
        return [self.score_one(_text(c), r) for c, r in zip(completions, required, strict=True)]

    def score_one(self, completion: str, function_name: str | None = None) -> RewardOutput:
        """Score one completion; ``function_name`` (if given) must be defined."""
        code = extract_code(completion)
        if code is None:
            return RewardOutput(
                0.0,
                "No code block found. Put the solution in a ```python ... ``` block.",
                {"code_found": False},
            )
        info: dict[str, Any] = {"code_found": True}
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            line = (exc.text or "").rstrip()
            where = f"line {exc.lineno}" if exc.lineno else "an unknown line"
            feedback = f"SyntaxError on {where} of the code block: {exc.msg}" + (
                f"\n    {line.strip()}" if line.strip() else ""
            )
            return RewardOutput(
                0.0, feedback, {**info, "syntax_ok": False, "error_line": exc.lineno}
            )
        except ValueError as exc:  # e.g. null bytes in the source
            return RewardOutput(
                0.0, f"The code block cannot be parsed: {exc}", {**info, "syntax_ok": False}
            )
        info["syntax_ok"] = True
        if function_name:
            defined = {
                node.name
                for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
            info["function_found"] = function_name in defined
            if not info["function_found"]:
                return RewardOutput(
                    0.0, f"The code does not define a function named `{function_name}`.", info
                )
        return RewardOutput(1.0, None, info)
