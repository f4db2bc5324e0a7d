"""The programs that run inside the sandbox are real Python files shipped as package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sdpo.environments.code import HARNESS
from sdpo.sandbox import _BOOT, _PROBE, sandbox_program

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("boot.py", "probe.py", "code_harness.py")


@pytest.mark.parametrize("name", PROGRAMS)
def test_each_program_is_python_that_compiles(name):
    source = sandbox_program(name)
    compile(source, name, "exec")
    assert (ROOT / "src" / "sdpo" / "sandbox_programs" / name).read_text() == source


def test_the_constants_are_the_files():
    assert (_BOOT, _PROBE, HARNESS) == tuple(sandbox_program(n) for n in PROGRAMS)
    assert "HOST_FILES" in _PROBE  # the placeholder _probe substitutes


def test_package_data_ships_the_programs():
    """setuptools' package-data globs decide what an install has; every program must match one."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["sdpo"]
    package = ROOT / "src" / "sdpo"
    shipped = {p.relative_to(package).as_posix() for g in globs for p in package.glob(g)}
    assert {f"sandbox_programs/{n}" for n in PROGRAMS} <= shipped
    assert not (package / "sandbox_programs" / "__init__.py").exists()  # never imported
