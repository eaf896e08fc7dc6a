"""Output files that a reader (or a resumed run) never finds half-written.

Each file is written beside its final name as ``NAME.partial``, then renamed over the final name: a rename within a
folder is atomic, so an interrupted write leaves the previous version (or nothing), never a truncated file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def _write_then_rename(path: str, write: Callable[[str], None]) -> None:
    """``write(partial_path)``, then the rename; a failed write removes what it left."""
    partial = path + ".partial"
    try:
        write(partial)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (synced before the rename)."""

    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _write_then_rename(path, write)


def write_json_atomically(path: str, data) -> None:
    """``data`` as indented JSON, whole or not at all (serialised before anything is written)."""
    write_text_atomically(path, json.dumps(data, indent=2))


def save_figure_atomically(fig, path: str, **savefig_kwargs) -> None:
    """A matplotlib figure saved as PNG to ``path``, whole or not at all."""
    _write_then_rename(path, lambda partial: fig.savefig(partial, format="png", **savefig_kwargs))
