"""Files and directories that are never seen half-written, with the permissions of a plain write.

Each is made beside its place and renamed into it (one rename is atomic on a POSIX filesystem), so a run
killed halfway leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        normal_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(staging: Path, target: Path) -> None:
    """The finished directory `staging` becomes `target`; the old `target`, if any, is removed after."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def normal_modes(path: Path) -> None:
    """The permissions a plain write would give (0666 / 0777 less the umask), on `path` and all below it.

    Temporary files and directories are created owner-only (mkstemp, mkdtemp, transformers' own
    save_pretrained), and a rename keeps that: without this a model directory could not be read by
    another user or a container running under another uid."""
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def normal_modes_for_new_files(directory: Path) -> Iterator[None]:
    """normal_modes on the files a writer that is not ours (transformers' save_pretrained) creates or replaces
    at the top of `directory` inside the block; whatever else is there (a hub repo's .git) stays as it was."""
    before = _files(directory)
    yield
    for path, identity in _files(directory).items():
        if before.get(path) != identity:
            normal_modes(path)


def _files(directory: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def _umask() -> int:
    """The process's umask, read without setting it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
