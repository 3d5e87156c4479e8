"""The library versions this service is built against, checked before any worker starts.

We subclass or read internals of several libraries (see the bounds in pyproject.toml); outside the
declared ranges they may change under us silently, so start-up refuses with one line instead. The
ranges are read from the installed package's metadata (or pyproject.toml in a clone that is not
installed): pyproject.toml stays the one declaration.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.requirements import Requirement

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def declared() -> list[str]:
    """The runtime requirements as declared (extras excluded)."""
    if _PYPROJECT.is_file():
        return list(tomllib.loads(_PYPROJECT.read_text())["project"]["dependencies"])
    return [r for r in importlib.metadata.requires("wsbroadcast") or [] if "extra ==" not in r]


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def problems(requirements: Iterable[str], installed: Callable[[str], str | None] = _installed) -> list[str]:
    """One line for each requirement the installed versions do not meet."""
    found = []
    for line in requirements:
        requirement = Requirement(line)
        version = installed(requirement.name)
        if version is None:
            found.append(f"{requirement.name} is not installed (need {requirement.specifier})")
        elif not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement.name} {version} is not supported (need {requirement.specifier})")
    return found
