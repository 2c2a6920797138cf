"""Text and JSON Lines files the package writes (shipped data, task data): whole or not at all."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["write_jsonl_atomic", "write_text_atomic"]


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """One ASCII JSON object per line, written whole (``write_text_atomic``)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8, newlines as written) to a temporary file renamed into place.

    A plain open (not mkstemp, whose files are 0600), so the file gets the usual permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
