"""Helpers for the entry points: turn user errors into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import CompressError


@contextlib.contextmanager
def user_errors(run_dir: str | Path | None = None) -> Iterator[None]:
    """Print `error: ...` for input errors and a resume hint on Ctrl-C, instead of a traceback."""
    try:
        yield
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except KeyboardInterrupt:
        where = f" hydra.run.dir={run_dir}" if run_dir else ""
        print(
            f"\ninterrupted: the last finished epoch is saved; continue with resume=true{where}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)
