"""Import ``griffin_batch`` from the working tree on a machine where it is not installed.

The package maps folders to names (``griffin_batch.model`` -> ``model/``,
``griffin_batch.data`` -> ``jobs/data/``; pyproject's
``[tool.setuptools] package-dir``). Where nothing can be installed (a lent GPU
machine without network), ``ensure_importable`` builds that mapping as a
folder of symlinks under a temporary directory and puts it first on
``sys.path`` (and ``PYTHONPATH``, for child processes), reading the mapping
from pyproject.toml so it never disagrees with an install. Where the package
is installed it does nothing.

``missing_modules`` names the third-party modules of a list that cannot be
found, so a benchmark can say all of them at once instead of failing on the
first import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "griffin_batch"


def package_dirs(root: str = ROOT) -> dict[str, str]:
    """pyproject's ``package-dir``: dotted package name -> folder relative to ``root``."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def build_tree(target: str, root: str = ROOT) -> str:
    """Creates ``target/griffin_batch/<name>`` symlinks to the working tree's folders.

    Returns:
      ``target``, the folder to put on ``sys.path``.
    """
    base = os.path.join(target, PACKAGE)
    os.makedirs(base, exist_ok=True)
    for name, folder in package_dirs(root).items():
        parts = name.split(".")
        if parts[0] != PACKAGE or len(parts) != 2:
            raise ValueError(f"pyproject package-dir {name!r}: expected {PACKAGE}.<name>")
        link = os.path.join(base, parts[1])
        if not os.path.lexists(link):
            os.symlink(os.path.join(root, folder), link)
    return target


def ensure_importable(root: str = ROOT) -> str | None:
    """Makes ``import griffin_batch.<name>`` work from ``root``'s tree if it does not already.

    Returns:
      The folder added to ``sys.path``, or None when the package was importable.
    """
    try:
        if importlib.util.find_spec(f"{PACKAGE}.model") is not None:
            return None
    except ModuleNotFoundError:  # no ``griffin_batch`` at all: find_spec imports the parent
        pass
    target = build_tree(tempfile.mkdtemp(prefix="griffin_batch_tree_"), root)
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return target


def missing_modules(names: list[str]) -> list[str]:
    """The top-level module names among ``names`` that cannot be imported here."""
    return [n for n in names if importlib.util.find_spec(n) is None]
