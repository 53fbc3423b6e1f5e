"""The one output policy every command that writes follows, checked before any long work.

Why: an output path is the one argument that can destroy something. ``-o`` pointing at the model's
``config.json``, a shard, the calibration text or the score file used to replace it with exit 0, and
an atomic rename over ``/dev/null`` (as root) or a FIFO replaced the special file with a regular one.

The rules (docs/reliability.md says the same for users):

1. Every path is resolved with :func:`os.path.realpath` first, so a symlink or ``..`` cannot hide an
   input. A symlinked output is written *through*: its target is replaced, the link is kept
   (:func:`bitalloc.plan.atomic_write_bytes` does the same at write time).
2. An output that resolves to an input of the command (or is the same file by inode: a hard link) is
   refused, and so is any output inside a model directory the command reads.
3. An existing output must be of the kind written: a regular file for file outputs, a directory for
   directory outputs; a device, a FIFO, a socket or the wrong kind is refused.
4. The output's directory must exist and be writable, and an existing output file writable.
5. Two outputs of one command may not be the same file.

A refusal is an :class:`~bitalloc.errors.OutputError` (one ``error:`` line, exit 2). The replaced
file's mode is kept by the writer, not here. Pure path logic: no torch, no model code.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import OutputError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class _Input:
    """One resolved input: what the user called it (``--calib``), its real path and, if it exists, its inode."""

    label: str
    real: str
    inode: Optional[tuple[int, int]]


@dataclass(frozen=True)
class Inputs:
    """Everything a command reads, resolved once: labelled files and model directories (with their files)."""

    files: tuple[_Input, ...]
    model_dirs: tuple[str, ...]

    @classmethod
    def of(cls, files: Mapping[str, Optional[PathLike] | Sequence[PathLike]],
           models: Iterable[Optional[PathLike]] = ()) -> "Inputs":
        """``files``: option label -> path (or paths, or None when not given); ``models``: model directories.

        Every entry of a model directory counts as an input too, resolved: a Hugging Face cache snapshot
        holds symlinks into a blob store outside the directory, and those blobs must be protected as well.
        """
        found: list[_Input] = []
        for label, given in files.items():
            paths = [] if given is None else [given] if isinstance(given, (str, os.PathLike)) else list(given)
            found += [_resolve(label, p) for p in paths]
        dirs = []
        for model in models:
            if model is None:
                continue
            real = _realpath(model, "model directory")
            dirs.append(real)
            found += [_resolve(f"{entry.name} of the model directory", entry.path) for entry in _entries(real)]
        return cls(tuple(found), tuple(dirs))

    def clash(self, real: str) -> Optional[str]:
        """Why writing ``real`` (a resolved path) would destroy an input, or None."""
        inode = _inode(real)
        for d in self.model_dirs:
            if real == d or real.startswith(d.rstrip(os.sep) + os.sep):
                return f"it is inside the model directory {d}"
        for i in self.files:
            if real == i.real or (inode is not None and inode == i.inode):
                return f"it is {i.label} ({i.real}), an input of this command"
        return None


def check_output_file(path: PathLike, inputs: Inputs) -> Path:
    """The resolved path a file output will be written to, or :class:`OutputError` if the policy refuses it."""
    real = _realpath(path, "output")
    shown = _short(path)
    why = inputs.clash(real)
    if why:
        raise OutputError(f"refusing to write {shown}: {why}; choose another output path")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"refusing to write {shown}: it exists and is {_kind(st.st_mode)}, not a regular file; "
                          "choose a file path")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {shown}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (st is not None and not os.access(real, os.W_OK)):
        raise OutputError(f"cannot write {shown}: permission denied")
    return Path(real)


def check_output_files(inputs: Inputs, *paths: Optional[PathLike]) -> list[Optional[Path]]:
    """:func:`check_output_file` for each given output of one command (None stays None); two outputs naming
    the same file are refused, since the second write would silently replace the first."""
    checked = [None if p is None else check_output_file(p, inputs) for p in paths]
    real = [p for p in checked if p is not None]
    if len(set(real)) < len(real):
        dup = next(p for p in real if real.count(p) > 1)
        raise OutputError(f"two outputs of this command name the same file {dup}; give each its own path")
    return checked


def check_output_dir(path: PathLike, inputs: Inputs, writes: Sequence[str]) -> Path:
    """The resolved directory an output directory will be, or :class:`OutputError`.

    ``writes`` are the names (fnmatch patterns, relative to the directory; ``*`` also matches ``/``) the
    command creates or replaces inside it: an input matching one is refused, as is the directory being an
    input, lying inside a model directory, or existing as something other than a directory. The nearest
    existing ancestor must be writable (the directory is created later).
    """
    real = _realpath(path, "output directory")
    shown = _short(path)
    why = inputs.clash(real)
    if why:
        raise OutputError(f"refusing to write {shown}: {why}; choose another output directory")
    for i in [*inputs.files, *(_Input("the model directory", d, None) for d in inputs.model_dirs)]:
        rel = os.path.relpath(i.real, real)
        inside = rel != os.pardir and not rel.startswith(os.pardir + os.sep)
        if inside and any(fnmatch.fnmatchcase(rel, w) for w in writes):
            raise OutputError(f"refusing to write {shown}: it would replace {i.label} ({i.real}); choose another "
                              "output directory")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise OutputError(f"refusing to write {shown}: it exists and is {_kind(os.lstat(real).st_mode)}, not a "
                          "directory")
    ancestor = real
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write {shown}: {ancestor} is not a writable directory")
    return Path(real)


def _realpath(path: PathLike, what: str) -> str:
    try:
        return os.path.realpath(path)
    except ValueError:  # an embedded NUL byte
        raise OutputError(f"{what} path {_short(path)!r} contains a NUL byte; fix the path") from None
    except OSError as exc:  # a symlink loop (strict realpath) or a name the OS refuses
        raise OutputError(f"cannot resolve {what} {_short(path)}: {exc.strerror}") from None


def _resolve(label: str, path: PathLike) -> _Input:
    real = _realpath(path, label)
    return _Input(label, real, _inode(real))


def _inode(real: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(real)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:  # missing or unreadable: the command's own reader says so
        return []


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _short(path: PathLike) -> str:
    text = str(path)
    return text if len(text) <= 120 else text[:117] + "..."
