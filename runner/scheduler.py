"""The mechanics of a night, apart from its decisions: the stop event, the signal handlers, and
the pool that runs one proposer thread and one worker per slot on tickets.

It knows nothing of experiments: the loop hands it what to call (propose a job, execute one,
whether a cap is reached) and hears back which thread failed first.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

J = TypeVar("J")  # a job, as the loop makes it
S = TypeVar("S")  # a worker's slot

POLL_S = 0.2   # how often a waiting thread looks at the stop event (seconds)
WAIT_S = 0.5   # how long the main thread waits on the threads between checks (seconds): it keeps the signals


class Scheduler:
    """The stop event of one night, its signal handlers, and its threads."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def install_signal_handlers(self, on_signal: Callable[[str], None]) -> Callable[[], None]:
        """First SIGINT/SIGTERM: `on_signal(its name)`, then stop after cleaning up the current
        run. Second: KeyboardInterrupt, to stop now. Off the main thread Python allows no
        handlers: nothing is installed.

        Returns:
            what puts the previous handlers back.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop.is_set():
                raise KeyboardInterrupt
            name = signal.Signals(signum).name
            on_signal(name)  # takes no lock: the main thread may hold it
            self.stop.set()
            # A raw write: a signal handler must not take the console's lock (the live panel may hold it).
            os.write(2, f"\n{name}: stopping after the current run is cleaned up (again to force)\n".encode())

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def run(self, slots: Sequence[S], prefetch: int, propose: Callable[[], J | None],
            execute: Callable[[J, S], None], capped: Callable[[int], bool],
            on_failure: Callable[[str, BaseException], None]) -> tuple[str, BaseException] | None:
        """Run jobs on `slots` until stopped or out of proposals: one proposer thread and one
        worker per slot, on futures. Sequential is one slot with prefetch 0.

        The proposer proposes only while it holds a ticket, and a worker returns its ticket when
        `execute` is done with its job (and every follow-up): len(slots) + prefetch tickets, so a
        proposal is ready for each idle worker plus `prefetch` more, and with prefetch 0 nothing
        is proposed on a best that a running experiment may still change.

        Args:
            propose: the next job, or None for a proposal that will not run (it counts as proposed).
            execute: run one job and whatever it causes, on a worker's slot.
            capped: whether the night's caps are reached after this many proposals (it stops the
                proposing; what was proposed still runs).
            on_failure: told of the first thread that raised, after the stop event is set.

        Returns:
            (who, exception) for the first exception of the proposer or a worker (the others are
            stopped), or None.

        Raises:
            KeyboardInterrupt: a forced stop; the threads are left to the caller's cleanup.
        """
        jobs: queue.Queue = queue.Queue()
        tickets = threading.Semaphore(len(slots) + prefetch)
        done_proposing = threading.Event()

        def produce():
            proposed = 0
            try:
                # A cap stops the proposing; what was proposed still runs (no tokens, a bounded overrun).
                while not self.stop.is_set() and not capped(proposed):
                    while not tickets.acquire(timeout=POLL_S):
                        if self.stop.is_set():
                            return
                    if capped(proposed):  # reached while waiting for a worker (max_hours)
                        return
                    job = propose()
                    proposed += 1
                    if job is None:
                        tickets.release()
                    else:
                        jobs.put(job)
            finally:
                done_proposing.set()

        def work(slot):
            while not self.stop.is_set():
                try:
                    job = jobs.get(timeout=POLL_S)
                except queue.Empty:
                    if done_proposing.is_set() and jobs.empty():
                        return
                    continue
                try:
                    execute(job, slot)
                finally:
                    tickets.release()

        pool = ThreadPoolExecutor(max_workers=len(slots) + 1, thread_name_prefix="loop")
        futures: dict[Future, str] = {pool.submit(produce): "proposer"}
        futures.update({pool.submit(work, slot): f"worker {i}" for i, slot in enumerate(slots)})
        failure = None
        pending = set(futures)
        try:
            # The main thread keeps the signals: it waits in short steps, never in a blind join.
            while pending:
                done, pending = wait(pending, timeout=WAIT_S, return_when=FIRST_EXCEPTION)
                for f in done:
                    exc = f.exception()
                    if exc is not None and failure is None:
                        failure = (futures[f], exc)
                        self.stop.set()
                        on_failure(futures[f], exc)
        except KeyboardInterrupt:  # forced stop: the caller removes the containers, nobody waits
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return failure
