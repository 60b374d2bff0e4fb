"""Rank 0's side of a tensor-parallel engine: start ranks 1..N-1, join their group, watch them, stop them.

A lost rank is fatal for the engine: its shard of every layer is gone and the group cannot go on. The
watchdog notices a worker that exits (its process sentinel) or a step that never returns (a collective
stuck on a hung peer), tells the API processes (EngineDead, via `on_fatal`) and ends this process with a
non-zero code, so the launcher starts the engine again. Never a silent hang.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import torch

from engine.config import EngineConfig
from engine.distributed.channel import CommandChannel
from engine.distributed.group import free_port, join_group
from engine.distributed.worker import run_worker

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.2


class TensorParallelWorkers:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.size = config.tensor_parallel_size
        self.device = device
        self.step_timeout_s = config.tensor_parallel_timeout_s
        self.on_fatal: Callable[[str], None] | None = None  # set by the engine core: tell the API processes
        self.channel: CommandChannel | None = None  # set once the model's dtype is known
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []  # to each worker: command headers (channel.py), block counts
        self._collective_since: float | None = None
        self._stopping = threading.Event()
        self._fatal_lock = threading.Lock()

    def start(self) -> None:
        """Spawns the workers (they load their shards in parallel with ours) and joins the group."""
        port = free_port()
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's threads and CUDA state
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker, args=(self.config, rank, port, theirs), name=f"tp-rank-{rank}", daemon=True
            )
            proc.start()
            theirs.close()  # the worker's end lives in the worker: its death closes the pipe for us
            self._procs.append(proc)
            self.pipes.append(ours)
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        # Any exit of this process that skips stop() (a start-up error, the offline LLM at interpreter
        # exit) must still end the workers: they ignore SIGTERM, which multiprocessing's own exit hook
        # sends before joining them. Registered after multiprocessing's hook, so it runs first.
        atexit.register(self.stop)
        join_group(0, self.size, port, self.device, self.step_timeout_s)
        logger.info("tensor parallel: %d ranks (worker pids %s)", self.size, [p.pid for p in self._procs])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    @contextlib.contextmanager
    def collective(self, what: str, timed: bool = True) -> Iterator[None]:
        """Marks a command the workers take part in: the watchdog times it (unless not `timed`: start-up
        waits for the workers' loading), and any failure inside it is fatal (the group is in an unknown
        state; retrying the step would hang or fail again)."""
        self._collective_since = time.monotonic() if timed else None
        try:
            yield
        except Exception as exc:
            # A peer's death usually shows here first (gloo: connection closed); name the cause if so.
            cause = self._dead_worker(wait_s=1.0)
            self.fatal(cause or f"tensor-parallel {what} failed: {type(exc).__name__}: {exc}")
        finally:
            self._collective_since = None

    def _dead_worker(self, wait_s: float) -> str | None:
        """Why the first worker that exited (within wait_s) is gone, or None while all run."""
        sentinels = {p.sentinel: p for p in self._procs}
        done = multiprocessing.connection.wait(list(sentinels), timeout=wait_s)
        if not done:
            return None
        proc = sentinels[done[0]]  # type: ignore[index]
        proc.join(timeout=1)
        return f"tensor-parallel worker {proc.name} (pid {proc.pid}) exited with code {proc.exitcode}"

    def _watch(self) -> None:
        while not self._stopping.is_set():
            dead = self._dead_worker(wait_s=_WATCH_INTERVAL_S)
            if self._stopping.is_set():
                return
            if dead is not None:
                self.fatal(dead)
            since = self._collective_since
            if since is not None and time.monotonic() - since > self.step_timeout_s:
                self.fatal(f"a tensor-parallel step has not returned for {self.step_timeout_s:.0f} s")

    def fatal(self, reason: str) -> None:
        """Ends the engine process (exit code 1) after telling the API processes; never returns."""
        with self._fatal_lock:
            logger.error("%s; the engine stops so that it can be restarted", reason)
            if self.on_fatal is not None:
                try:
                    self.on_fatal(reason)
                except Exception:
                    logger.exception("could not report the engine's death")
            for proc in self._procs:
                if proc.is_alive():
                    proc.kill()
            os._exit(1)

    def stop(self) -> None:
        """Clean shutdown: workers leave their loop, then the group is torn down."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.channel is not None and all(p.is_alive() for p in self._procs):
            with contextlib.suppress(Exception):
                self.channel.send_stop()
        for pipe in self.pipes:
            pipe.close()  # a worker still loading, or not yet told to stop, ends on EOF
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
