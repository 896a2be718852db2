"""Output files: checked before any work, written atomically, so a failing or interrupted run never leaves a truncated
file nor replaces a good one with a bad one.

Policy: an output's folder is created when missing; a path that cannot be written is a one-line error up front.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hyfx.errors import HyfxError


def check_writable(path: str | Path, what: str = "output") -> Path:
    """`path` as a Path once its folder exists (created if missing) and a file can be created there."""
    path = Path(path)
    if path.is_dir():
        raise HyfxError(f"{what} {path} is a folder: pass a file name")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise HyfxError(f"cannot write {what} {path}: {blocking} is a file, not a folder; pass a path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise HyfxError(f"cannot write {what} {path} ({exc.strerror or exc.__class__.__name__}): "
                        "pass a path in a writable folder") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Lay out, write atomically (the format from the suffix) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
