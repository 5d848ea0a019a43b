"""The local executor: the attempts run in this harness's threads, ``jobs`` at a time, each
lmms-eval child in its own process group, stopped with the harness (SIGINT, SIGTERM)."""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from otprune.harness.attempt import Attempt, execute
from otprune.harness.executors import Outcome
from otprune.harness.files import LeaseLost
from otprune.harness.plan import describe
from otprune.harness.processes import Children


class Stopped(Exception):
    """SIGINT or SIGTERM reached the harness."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def log_tail(attempt: Attempt, record: dict, lines: int = 15) -> str:
    text = (attempt.run.folder / record["log"]).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def run_local(attempts: list[Attempt], jobs: int) -> Outcome:
    """Run ``attempts`` ``jobs`` at a time and print each one's end; a signal stops every child
    (their attempts are recorded as failed) and ends the outcome with ``stopped_by``."""
    outcome = Outcome()
    children = Children()

    def one(index: int, attempt: Attempt) -> None:
        run = attempt.run
        if jobs == 1:
            print(f"[{index}/{len(attempts)}] {describe(run)} ...", end=" ", flush=True)
        try:
            record = execute(attempt, children)
        except LeaseLost:
            return  # another harness holds the folder now; the lock said so and stops this one
        except OSError as error:
            print(f"FAILED: {error.filename or run.folder}: {error.strerror}; check that the runs folder is writable and has free space", flush=True)
            outcome.failed.append(attempt)
            return
        if record is None:
            return
        end = (
            f"done in {record['wall_s']:.1f} s"
            if record["status"] == "done"
            else (f"FAILED after {record['wall_s']:.1f} s ({record['reason']}); log: {run.folder / record['log']}")
        )
        prefix = "" if jobs == 1 else f"[{index}/{len(attempts)}] {describe(run)} ... "
        print(prefix + end, flush=True)
        if record["status"] != "done":
            print(log_tail(attempt, record), flush=True)
            outcome.failed.append(attempt)

    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(one, index, attempt) for index, attempt in enumerate(attempts, 1)]
        for future in futures:
            future.result()
    except Stopped as stop:
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        stopped = children.stop(f"{stop.args[0]} to the harness")
        pool.shutdown(wait=True, cancel_futures=True)
        print(
            f"\nstopped by {stop.args[0]}: {stopped} lmms-eval child process group(s) stopped; finished runs are kept. Run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        outcome.stopped_by = stop.signum
    finally:
        pool.shutdown(wait=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return outcome
