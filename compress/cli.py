"""Helpers for the entry points: turn user errors into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
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


class Preempted(SystemExit):
    """A run stopped by a scheduler's signal (SIGTERM, SIGUSR1, SIGUSR2: what SLURM sends
    before it preempts or times out a job) after saving a resumable last.pt (compress.engine).

    It exits with 128 + the signal's number, the status of a process killed by that signal:
    the job did end because of it, but cleanly, and `where` says what was saved. A SystemExit,
    so a sweep ends with it as with Ctrl-C, and a library caller's `except Exception` does not
    swallow it. `main`: this process prints the line (rank 0 under torchrun)."""

    def __init__(self, signum: int, where: str, main: bool = True) -> None:
        super().__init__(128 + signum)
        self.signum, self.where, self.main = signum, where, main


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
    except Preempted as e:
        if e.main:
            where = f" hydra.run.dir={run_dir}" if run_dir else ""
            name = signal.Signals(e.signum).name
            print(
                f"\npreempted ({name}): {e.where}; continue with resume=true{where}",
                file=sys.stderr,
                flush=True,
            )
        hand_on_signal(e.signum)
        raise
    except KeyboardInterrupt:
        where = f" hydra.run.dir={run_dir}" if run_dir else ""
        print(
            "\ninterrupted: last.pt holds the last finished epoch (or schedule.checkpoint_every "
            f"step); continue with resume=true{where}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(INTERRUPTED)


def hand_on_signal(signum: int) -> None:
    """Give a preemption signal that the engine caught (and saved the run for) to the handler
    the process had before, so that whoever installed it hears of it too.

    Under submitit (hydra-submitit-launcher) that is submitit's preemption handler, on
    SIGUSR2 by default (SUBMITIT_PREEMPT_SIGNAL=USR1 for SIGUSR1; SIGTERM it ignores): it asks
    the launcher for the job to requeue, which is the same job with the same overrides,
    requeues it with `scontrol requeue` and exits. The job's overrides get `resume=true`
    first (`_requeue_resumes`), so the requeued job continues from the saved last.pt instead of
    starting over; submitit's exit is then replaced by ours (Preempted's status). Without a
    Python handler (plain SLURM, a shell's kill) there is nothing to hand on: requeue there
    with the batch script (`sbatch --requeue`, resume=true when RUN/last.pt exists)."""
    handler = signal.getsignal(signum)
    if not callable(handler) or handler is signal.default_int_handler:
        return
    _requeue_resumes(handler)
    with contextlib.suppress(SystemExit):  # submitit's "requeued, exit now": we exit next
        handler(signum, None)


def _requeue_resumes(handler: Callable[..., Any]) -> bool:
    """Add `resume=true` to the overrides of the job submitit would requeue, if `handler` is
    submitit's for a hydra-submitit-launcher job (its DelayedSubmission holds the launcher and,
    first of its arguments, the job's overrides); True when it did."""
    delayed = getattr(getattr(handler, "__self__", None), "_delayed", None)
    launcher = getattr(delayed, "function", None)
    module = type(launcher).__module__ if launcher is not None else ""
    args = tuple(getattr(delayed, "args", ()) or ())
    if not module.startswith("hydra_plugins.hydra_submitit_launcher") or not args:
        return False
    if not isinstance(args[0], list | tuple) or not all(isinstance(o, str) for o in args[0]):
        return False
    kept = [o for o in args[0] if o.lstrip("+~").partition("=")[0] != "resume"]
    delayed.args = ([*kept, "resume=true"], *args[1:])
    return True


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
    except Preempted:  # the process was asked to stop: the sweep stops with it
        raise
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
