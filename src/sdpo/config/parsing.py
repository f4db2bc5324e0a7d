"""Reading config values: YAML with unique keys, strings from the command line converted to each
key's type, prompt templates checked, and suggestions for a mistyped key."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import string
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sdpo.config.sections import (
    SECTIONS,
    _leaf_keys,
)

TEMPLATE_FIELDS: dict[str, tuple[set[str], str | None]] = {
    "reprompt_template": ({"prompt", "solution", "feedback"}, "prompt"),
    "solution_template": ({"successful_previous_attempt"}, None),
    "feedback_template": ({"feedback_raw"}, None),
}


def _check_template(key: str, text: str, fields: set[str], required: str | None) -> None:
    """A ``str.format`` template may use only ``fields`` (``{{``/``}}`` for literal braces)."""
    try:
        used = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(
            f"{key} is not a valid template ({exc}); write a literal brace as {{{{ or }}}}."
        ) from None
    allowed = ", ".join("{" + f + "}" for f in sorted(fields))
    for name in used:
        if name not in fields:
            raise ValueError(f"{key} has an unknown field {{{name}}}; its fields are {allowed}.")
    if required and required not in used:
        raise ValueError(f"{key} must contain {{{required}}} (its fields are {allowed}).")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; every error names the file (and the line for syntax errors)."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a YAML config file.")
    if not path.exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a UTF-8 text file (byte {exc.start}); give a YAML config file."
        ) from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # marks say the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and key in SECTIONS:
            items.extend(_flatten(value, full + "."))
        else:
            items.append((full, value))
    return items


@functools.cache
def _all_keys(cls: type) -> tuple[str, ...]:
    top = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS]
    return tuple(top + [key for s, c in SECTIONS.items() for key in _leaf_keys(s, c)])


def _suggestions(key: str, valid: list[str]) -> str:
    """ " Did you mean: ...?" for a typo of a key, or "".

    Only close spellings count (difflib ratio >= 0.75: a letter or two off). A section's key is
    compared by its leaf name, and only within the section the key names (if it names one), so a
    setting elsewhere whose name merely looks alike (use_cpu / is_clip) is not offered."""
    section, _, leaf = key.rpartition(".")
    named = section if any(k.rpartition(".")[0] == section for k in valid) else ""
    leaf_count: dict[str, int] = {}
    for k in valid:
        leaf_count[k.split(".")[-1]] = leaf_count.get(k.split(".")[-1], 0) + 1
    scored = []
    for k in valid:
        owner, _, name = k.rpartition(".")
        if not owner:  # a top-level key (model_name): compared as written
            score = difflib.SequenceMatcher(None, key, k).ratio()
        elif named and owner != named:
            continue
        else:
            score = difflib.SequenceMatcher(None, leaf, name).ratio()
        if score >= 0.75:
            shown = name if leaf_count[name] == 1 and not named else k
            scored.append((-score, shown))
    close = list(dict.fromkeys(shown for _, shown in sorted(scored)))[:3]
    return f" Did you mean: {', '.join(close)}?" if close else ""


_NONE_STRINGS = {"none", "null", "~", ""}


def _convert(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to ``typ`` or raise ValueError."""
    args = typing.get_args(typ) if isinstance(typ, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if value is None or (
        isinstance(value, str) and optional and value.strip().lower() in _NONE_STRINGS
    ):
        if optional:
            return None
        raise ValueError(f"{key} may not be None; expected {base.__name__}.")
    if isinstance(value, str) and base in (int, float):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value) if base is float else int(value)
        except ValueError:
            pass
    if isinstance(value, str) and base is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"{key}: cannot parse {value!r} as {base.__name__}.") from exc
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if base is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ValueError(f"{key} must be an integer, got {value!r}.")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}.")
        return value
    if typing.get_origin(base) is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):  # a,b
            value = [v.strip() for v in value.split(",") if v.strip()]
        if typing.get_args(base) == (float,):
            if not isinstance(value, list):
                raise ValueError(
                    f"{key} must be a list of numbers, e.g. [1.0, 0.5]; got {value!r}."
                )
            return [_convert(f"{key}[{i}]", v, float) for i, v in enumerate(value)]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                f"{key} must be a list of strings, e.g. {key}=a,b or {key}=[] for none; "
                f"got {value!r}."
            )
        return value
    return value
