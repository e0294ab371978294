"""Dead-rank detection: heartbeats in the rendezvous store, a failure message naming the lost rank.

Why: when a rank of a multi-rank run dies (node failure, OOM killer, SIGKILL), the others would
otherwise wait in their next collective until the process-group timeout, or be torn down by the
launcher without saying why. Each rank instead

* runs a daemon thread that writes a heartbeat ``"<counter> <global step>"`` under
  ``twist/watchdog/<restart>/hb/<rank>`` of the job's TCP store (the one every launcher already
  runs: torchrun's agent, or rank 0 under srun / mpirun) every ``interval`` seconds, and watches
  ONE neighbour, rank ``(rank + 1) % world`` (so the store sees O(world) operations per interval,
  not O(world^2)). A neighbour whose counter has not moved for ``timeout`` seconds, or that left an
  error marker, is reported under ``.../lost`` and this rank stops (exit code 75,
  ``EXIT_RANK_FAILURE``: "temporary failure, restart from the last checkpoint");
* wraps training in :meth:`Watchdog.guard`: a collective that raises (gloo raises at once when a
  peer's connection closes), or SIGTERM from the launcher (torchrun stops the surviving workers
  when one dies), leads to a diagnosis: the ``lost`` record if some rank already wrote one, else
  the ranks whose counter does not move over ``2.5 x interval`` and that did not exit cleanly.
  The message names them with their last reported step; the rank exits with code 75. When a
  collective TIMED OUT and no rank is lost, the ranks whose heartbeat moves but whose reported
  step is behind this rank's are named as alive but stuck (a deadlock, a hung file system).

Every rank that leaves writes ``.../exit/<rank>``: ``done`` after a normal run (so finishing
first is not mistaken for dying); ``stopped: ...`` for a refusal or a training stop that every
rank raises together (ConfigError, CheckpointError, DataError, TrainingError: not a failure);
``error: ...`` for any other exception (its neighbour then stops too, naming it, instead of
waiting in a collective). The heartbeat thread only proves the PROCESS is alive: a rank hung
inside a collective keeps beating, and is caught by the process-group timeout
(``--distributed-timeout-minutes``): the ranks waiting for it name it as stuck (above) and exit 75,
and it then sees their exit markers and stops too.

A single process (world size 1) runs no watchdog.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch.distributed as dist

EXIT_RANK_FAILURE = 75  # EX_TEMPFAIL: restart from the latest checkpoint


class RankFailure(RuntimeError):
    """Another rank of the job was lost; ``lost`` lists (rank, last step it reported)."""

    def __init__(self, message: str, lost=()):
        super().__init__(message)
        self.lost = tuple(lost)


class Terminated(BaseException):
    """SIGTERM arrived (the launcher stops the job). A BaseException, so ``except Exception``
    blocks on the way up do not swallow it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def heartbeat_interval(timeout_s: float) -> float:
    return min(5.0, max(0.5, timeout_s / 20.0))


class Watchdog:
    def __init__(
        self,
        store,
        rank: int,
        world_size: int,
        timeout_s: float,
        interval_s: Optional[float] = None,
        store_host: str = "rank 0",
        store_address: str = "",
        log: Callable[[str], None] = None,
    ):
        self.store, self.rank, self.world = store, rank, world_size
        self.timeout = float(timeout_s)
        self.interval = interval_s or heartbeat_interval(self.timeout)
        self.store_host, self.store_address = store_host, store_address
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"twist/watchdog/{restart}"
        self.step = -1  # the global step this rank is at (set by the trainer)
        self._counter = 0
        self._lock = threading.Lock()  # one store operation at a time on this client
        self._stop = threading.Event()
        self._neighbour = (rank + 1) % world_size
        self._seen: Optional[bytes] = None
        self._seen_at = time.monotonic()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def for_job(cls, timeout_s: float, log: Callable[[str], None] = None) -> Optional["Watchdog"]:
        """A started watchdog for this rank of a multi-rank job (None for a single process)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        # A client connection of its own to the job's store (never the process group's: its
        # operations then cannot interleave with the group's).
        try:
            store = dist.TCPStore(
                addr,
                int(port),
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=max(10.0, min(timeout_s, 60.0))),
            )
        except Exception as e:  # noqa: BLE001 - no watchdog is better than no run; the group timeout remains
            print(
                f"[twist] rank {dist.get_rank()}: no dead-rank watchdog (the job's store at {addr}:{port} is not "
                f"reachable: {_first_line(e)}); a lost rank is detected by the collective timeout only",
                file=sys.stderr,
                flush=True,
            )
            return None
        host = "the launcher's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
        wd = cls(
            store,
            dist.get_rank(),
            dist.get_world_size(),
            timeout_s,
            store_host=host,
            store_address=f"{addr}:{port}",
            log=log,
        )
        wd.start()
        return wd

    def start(self) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._run, name="twist-watchdog", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "done") -> None:
        """Leave: the exit marker first (neighbours must not take the silence that follows for a
        death), then the thread stops."""
        if self._stop.is_set():
            return
        self._mark_exit(reason)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def beat(self, step: int) -> None:
        self.step = step

    # ------------------------------------------------------------------ store helpers
    def _key(self, kind: str, rank: Optional[int] = None) -> str:
        return f"{self.prefix}/{kind}" + ("" if rank is None else f"/{rank}")

    def _get(self, key: str) -> Optional[bytes]:
        with self._lock:
            if not self.store.check([key]):
                return None
            return self.store.get(key)

    def _set(self, key: str, value: str) -> None:
        with self._lock:
            self.store.set(key, value)

    def _beat(self) -> None:
        self._counter += 1
        self._set(self._key("hb", self.rank), f"{self._counter} {self.step}")

    def _mark_exit(self, reason: str) -> None:
        try:
            self._set(self._key("exit", self.rank), reason[:2000])
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            pass

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                lost = self._get(self._key("lost"))
                if lost is not None:
                    self._fail(lost.decode())
                self._watch_neighbour()
            except Exception as e:  # noqa: BLE001 - the store itself is unreachable
                if self._stop.is_set():
                    return
                self._fail(self._store_lost(e))

    def _watch_neighbour(self) -> None:
        n, now = self._neighbour, time.monotonic()
        exit_reason = self._get(self._key("exit", n))
        if exit_reason is not None:
            reason = exit_reason.decode()
            # 'done' and 'stopped: ...' (an error every rank raises together) are no failure of n.
            if reason.startswith(("error", "failed")):
                self._report_lost(f"rank {n} stopped: {reason}")
            return
        value = self._get(self._key("hb", n))
        if value != self._seen:
            self._seen, self._seen_at = value, now
        elif now - self._seen_at > self.timeout:
            self._report_lost(
                f"rank(s) [{n}] lost (no heartbeat for {now - self._seen_at:.1f} s, timeout "
                f"{self.timeout:g} s{_steps([(n, _step_of(value))])})"
            )

    def _report_lost(self, text: str) -> None:
        try:
            self._set(self._key("lost"), text)
        except Exception:  # noqa: BLE001
            pass
        self._fail(text)

    # ------------------------------------------------------------------ diagnosis
    def find_lost(self) -> Tuple[Optional[str], List[Tuple[int, int]]]:
        """(a description, [(rank, last step)]) of lost ranks, or (None, []) if every rank is alive."""
        try:
            recorded = self._get(self._key("lost"))
            if recorded is not None:
                return recorded.decode(), []
            before = self._snapshot()
            time.sleep(2.5 * self.interval)
            recorded = self._get(self._key("lost"))
            if recorded is not None:
                return recorded.decode(), []
            after = self._snapshot()
        except Exception as e:  # noqa: BLE001
            return self._store_lost(e), []
        lost, errors = [], []
        for r in range(self.world):
            if r == self.rank:
                continue
            (hb0, _), (hb1, ex) = before[r], after[r]
            if ex is not None and ex != "done":
                errors.append(f"rank {r} stopped: {ex}")
            elif ex is None and hb0 == hb1:
                lost.append((r, _step_of(hb1)))
        if not lost and not errors:
            return None, []
        parts = errors + (
            [f"rank(s) {[r for r, _ in lost]} lost (no heartbeat for {2.5 * self.interval:.1f} s" + _steps(lost) + ")"]
            if lost
            else []
        )
        return "; ".join(parts), lost

    def find_stuck(self) -> Optional[str]:
        """After a collective timed out while every rank is alive: the ranks that stopped making
        progress, i.e. whose heartbeat still moves (the process lives) but whose reported step is
        behind this rank's. None if no rank is behind (then the timeout has another cause)."""
        try:
            snapshot = self._snapshot()
        except Exception as e:  # noqa: BLE001
            return self._store_lost(e)
        behind = [
            (r, _step_of(hb))
            for r, (hb, ex) in snapshot.items()
            if r != self.rank and ex is None and 0 <= _step_of(hb) < self.step
        ]
        if not behind:
            return None
        return (
            f"rank(s) {[r for r, _ in behind]} alive but stuck (heartbeat still moving; "
            f"{', '.join(f'rank {r} at step {s}' for r, s in behind)}, while this rank waited at step "
            f"{self.step} in a collective until the timeout of {self.timeout:g} s)"
        )

    def _store_lost(self, e: BaseException) -> str:
        return (
            f"{self.store_host} was lost: the job's store it hosts ({self.store_address}) stopped answering "
            f"({type(e).__name__}: {_first_line(e)})"
        )

    def _snapshot(self) -> dict:
        out = {}
        for r in range(self.world):
            hb = self._get(self._key("hb", r))
            ex = self._get(self._key("exit", r))
            out[r] = (hb, ex.decode() if ex is not None else None)
        return out

    def _fail(self, text: str) -> None:
        """Stop this rank now, from any thread, with a message naming what was lost."""
        if self._stop.is_set() and threading.current_thread() is not threading.main_thread():
            return  # this rank has already left the guarded block: not watched any more
        message = (
            f"[twist] rank {self.rank}/{self.world}: {text}. Stopping this rank at step {self.step} "
            f"(exit code {EXIT_RANK_FAILURE}); restart the job with --load SAVE_DIR to resume from "
            "the latest complete checkpoint"
        )
        self._stop.set()
        self._mark_exit(f"failed after: {text}")
        sys.stdout.flush()
        self.log(message)
        sys.stderr.flush()
        os._exit(EXIT_RANK_FAILURE)

    @contextlib.contextmanager
    def guard(self):
        """Training under this block: a lost rank (a collective that raised, or SIGTERM) becomes a
        message naming it and exit code 75; any other error is re-raised after the exit marker is
        written (so the other ranks stop too, naming this one). The heartbeat stops when the block
        is left, whichever way: teardown (the store may go away with the rank hosting it) is not
        watched."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            yield self
            self.stop("done")
        except Terminated:
            _quiet_sigterm(in_main)  # a second SIGTERM must not interrupt the diagnosis
            text, _ = self.find_lost()
            self._fail(
                text
                or "received SIGTERM (the launcher or the scheduler stopped the job); every other rank is still alive"
            )
        except Exception as e:
            _quiet_sigterm(in_main)  # the launcher's SIGTERM may follow a collective's error
            from ..errors import CheckpointError, ConfigError, DataError, TrainingError

            if isinstance(e, (ConfigError, CheckpointError, DataError, TrainingError)):
                # Refusals and training stops are raised by every rank together: not a lost rank.
                self.stop(f"stopped: {type(e).__name__}: {str(e)[:500]}")
                raise
            text, _ = self.find_lost()
            if text is None and _is_timeout(e):
                text = self.find_stuck()
            if text is not None:
                self._fail(f"{text} (seen here as {type(e).__name__}: {_first_line(e)})")
            self.stop(f"error: {type(e).__name__}: {str(e)[:500]}")
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


def _quiet_sigterm(in_main: bool) -> None:
    """From here on this rank is leaving anyway (in seconds): SIGTERM waits for it."""
    if in_main:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _is_timeout(e: BaseException) -> bool:
    # gloo: "Timed out waiting ...ms for recv operation to complete"; NCCL's watchdog: "...timeout".
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _steps(lost) -> str:
    known = [f"rank {r} at step {s}" for r, s in lost if s >= 0]
    return f"; last reported: {', '.join(known)}" if known else ""


def _step_of(value: Optional[bytes]) -> int:
    try:
        return int(value.split()[1])
    except (AttributeError, IndexError, ValueError):
        return -1
