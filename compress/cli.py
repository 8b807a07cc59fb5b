"""Helpers for the entry points: turn user errors into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from compress.errors import CompressError

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILED_FILE = "failed.json"  # a sweep job's {status, reason} when it did not finish
INTERRUPTED = 130


class EntryExit(SystemExit):
    """An entry point's exit on a user error (code 2) or divergence (code 3), carrying its one
    line, so a sweep can record the reason of the job instead of ending with it."""

    def __init__(self, code: int, status: str, reason: str) -> None:
        super().__init__(code)
        self.status, self.reason = status, reason


@contextlib.contextmanager
def user_errors(run_dir: str | Path | None = None) -> Iterator[None]:
    """Print `error: ...` for input errors and a resume hint on Ctrl-C, instead of a traceback."""
    try:
        yield
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise EntryExit(2, "failed", str(e)) from None
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise EntryExit(3, "diverged", str(e)) from None
    except KeyboardInterrupt:
        where = f" hydra.run.dir={run_dir}" if run_dir else ""
        print(
            f"\ninterrupted: the last finished epoch is saved; continue with resume=true{where}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(INTERRUPTED)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def sweep_job(task: Callable[[], T], run_dir: str | Path) -> T | float:
    """Run one job of a multirun so that its failure does not end the sweep.

    Hydra's launchers stop at an exit (and at an exception only after the batch, without the
    sweep report), so every failure of the job, a user error, divergence or any exception,
    is written to RUN/failed.json as {status, reason} (`diverged` for FloatingPointError, else
    `failed`) and the job returns NaN, which no sweeper takes as the best. Ctrl-C still ends
    the sweep.
    """
    run_dir = Path(run_dir)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # from an earlier attempt at this job
    try:
        return task()
    except EntryExit as e:  # already printed as one line by user_errors
        status, reason = e.status, e.reason
    except SystemExit as e:
        if e.code in (None, 0, INTERRUPTED):
            raise
        status, reason = "failed", f"exit code {e.code}"
    except FloatingPointError as e:
        status, reason = "diverged", str(e)
    except CompressError as e:
        status, reason = "failed", str(e)
    except Exception as e:  # a bug, not the user's input: keep its traceback in the job's log
        log.exception("the job raised")
        status, reason = "failed", _one_line(e)
    reason = " ".join(reason.split())  # one line in the tables
    write_json(run_dir / FAILED_FILE, {"status": status, "reason": reason})
    log.error("job %s: %s (in %s); the sweep goes on", status, reason, run_dir / FAILED_FILE)
    return float("nan")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)
