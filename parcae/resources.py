"""Where the shipped recipes and config pieces are: ``recipes/`` and ``configs/`` at the top of a source checkout,
or their copies installed with the package (a wheel puts them at ``parcae/recipes`` and ``parcae/configs``)."""

from __future__ import annotations

from pathlib import Path

from parcae.errors import UsageError

_PACKAGE = Path(__file__).resolve().parent


def shipped(folder: str) -> Path:
    """``recipes`` or ``configs``: the installed copy when there is one, else the checkout's folder."""
    for candidate in (_PACKAGE / folder, _PACKAGE.parent / folder):
        if candidate.is_dir():
            return candidate
    raise UsageError(f"the shipped {folder}/ folder is missing from this installation ({_PACKAGE}); reinstall parcae")


def suites_dir() -> Path:
    return shipped("recipes") / "mini" / "suites"
