"""Turning `files` arguments (files, folders, glob patterns) into a list of files to send."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from .images import IMAGE_SUFFIXES

_GLOB_CHARS = frozenset("*?[")


def expand_paths(specs: Iterable[str]) -> tuple[list[Path], list[str]]:
    """(files, problems) for the given arguments, each file once, in argument order.

    A file named directly is taken whatever its name (its content decides later); a folder is
    searched recursively for .jpg/.jpeg/.png (any case), skipping hidden entries such as a
    watcher's .done folder; a pattern the shell did not expand (quoted, or on Windows) is
    globbed here, with `**` for any depth. An argument that names nothing is a problem.
    """
    files: dict[Path, None] = {}
    problems: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = list(images_under(path))
        elif path.is_file():
            found = [path]
        elif _GLOB_CHARS & set(spec):
            found = []
            for match in sorted(glob.glob(spec, recursive=True)):
                found.extend(images_under(Path(match)) if os.path.isdir(match) else [Path(match)])
        else:
            problems.append(f"{spec}: no such file or directory")
            continue
        if not found:
            problems.append(f"{spec}: no image files found")
        for file in found:
            files.setdefault(file, None)
    return list(files), problems


def images_under(folder: Path) -> Iterable[Path]:
    """Image files below `folder`, sorted, without descending into hidden folders."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(root) / name
