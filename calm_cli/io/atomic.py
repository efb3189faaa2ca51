"""Atomic writes: every file calm writes appears whole or not at all.

A file is written under a temporary name in its own folder and renamed over the target
only when writing succeeded, so a crash, Ctrl-C or `kill -9` leaves the old file (or none),
never half of one. The temporary name is `.{target}.{pid}.{random}.tmp`; a `kill -9` leaves
it behind, and the next write of the same target removes those whose process is gone and
that nothing has touched for ten minutes (only names of that pattern).

A set of files that must change together (a model's config, weights and tokenizer) goes
through `replace_files`, which stages them and commits with a journal; readers find the
current version of each with `current_file`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def usual_mode(path: Path) -> None:
    """mkstemp makes files 0600; give the result the mode a plain open() would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


ORPHAN_AGE_S = 600  # a temporary untouched this long, of a pid not alive here, is a killed writer's


def remove_orphans(target: Path) -> list[Path]:
    """Delete the temporary files of `target` left by killed writers; return them.

    The pid alone is not proof on a folder another machine or container also writes (other
    pid namespaces), so the file must also have been left untouched for ORPHAN_AGE_S.
    """
    prefix = f".{target.name}."
    removed = []
    now = time.time()
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid, _, rest = candidate.name[len(prefix):].partition(".")
        try:
            stale = now - candidate.stat().st_mtime > ORPHAN_AGE_S
        except OSError:
            continue
        if pid.isdigit() and rest and stale and not _process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        usual_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """open() for writing whose result replaces `path` only once the file is complete and closed."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


COMMIT_FILE = ".calm-commit.json"


def staged_name(name: str) -> str:
    """Where `replace_files` writes the new `name` before the commit makes it current."""
    return f".{name}.new"


def current_file(directory: str | os.PathLike, name: str) -> Path:
    """The current version of `name` in a folder `replace_files` writes.

    While a commit is being applied (its journal lists `name` and the staged file still
    exists) the staged file is the current one; otherwise `name` itself is.
    """
    folder = Path(directory)
    staged = folder / staged_name(name)
    return staged if name in _committed_names(folder) and staged.exists() else folder / name


def _committed_names(folder: Path) -> list[str]:
    """The names listed by an unfinished commit's journal ([] when there is none or it is unreadable)."""
    try:
        names = json.loads((folder / COMMIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def replace_files(directory: str | os.PathLike, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace the files named in `writers` in `directory` as one change; leave every other file alone.

    Each writer fills the path it is given.  All new files are written and synced under
    staged names first; then a journal listing them is written atomically (the commit
    point: from here readers using `current_file` see the new set); then each is renamed
    over its target and the journal is removed.  A kill at any moment leaves either the
    old set or the new one current, never a mix; the next call finishes or discards it.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _finish_commit(folder)
    staged = {name: folder / staged_name(name) for name in writers}
    try:
        for name, write in writers.items():
            staged[name].unlink(missing_ok=True)
            write(staged[name])
            usual_mode(staged[name])
            _fsync(staged[name])
    except BaseException:
        for path in staged.values():
            path.unlink(missing_ok=True)
        raise
    journal = folder / staged_name(COMMIT_FILE)
    journal.write_text(json.dumps(sorted(writers)) + "\n", encoding="utf-8")
    _fsync(journal)
    os.replace(journal, folder / COMMIT_FILE)
    _fsync(folder)
    _finish_commit(folder)


def _finish_commit(folder: Path) -> None:
    """Apply a journaled commit (renames whatever is still staged), then drop the journal."""
    names = _committed_names(folder)
    for name in names:
        staged = folder / staged_name(name)
        if staged.exists():
            os.replace(staged, folder / name)
    if names or (folder / COMMIT_FILE).exists():
        _fsync(folder)
        (folder / COMMIT_FILE).unlink(missing_ok=True)
        _fsync(folder)
    (folder / staged_name(COMMIT_FILE)).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
