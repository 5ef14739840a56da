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
            found = list(images_under(path, problems))
        elif path.is_file():
            found = [path]
        elif path.exists():  # a FIFO would block the read forever; a device or socket is no image either
            problems.append(f"{shown(spec)}: not a regular file")
            continue
        elif _GLOB_CHARS & set(spec):
            found = []
            for match in sorted(glob.glob(spec, recursive=True)):
                if os.path.isdir(match):
                    found.extend(images_under(Path(match), problems))
                elif os.path.isfile(match):
                    found.append(Path(match))
        else:
            problems.append(f"{shown(spec)}: no such file or directory")
            continue
        if not found:
            problems.append(f"{shown(spec)}: no image files found")
        for file in found:
            files.setdefault(file, None)
    return list(files), problems


def images_under(folder: Path, problems: list[str] | None = None) -> Iterable[Path]:
    """Regular image files below `folder`, sorted, without descending into hidden folders.

    A subfolder that cannot be listed is named in `problems` (when given) rather than skipped unseen.
    """

    def unreadable(exc: OSError) -> None:
        if problems is not None:
            problems.append(f"{shown(exc.filename or folder)}: cannot list it ({exc.strerror or exc})")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                path = Path(root) / name
                if path.is_file():
                    yield path


def shown(path: str | os.PathLike[str]) -> str:
    """`path` as text that can always be printed, logged or put in a frame's meta.

    A name that is not valid UTF-8 (a Latin-1 name from an SMB share or a camera's card) reaches
    Python with surrogate escapes, which printing, msgpack and JSON all refuse; its stray bytes are
    shown as \\xNN escapes instead.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")
