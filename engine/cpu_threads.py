"""OpenMP wait policy for the engine's CPU threads, set before torch loads its OpenMP runtime.

torch's CPU wheel uses GNU OpenMP, whose threads spin for a while at the end of every parallel region.
A decode step runs hundreds of small parallel regions, and on a machine whose cores are shared (the API
process, other programs) a spinning thread burns the time slice its partner needs to finish: measured on
a loaded 2-core machine, one bf16 decode step took 1.1-2.9 s with the default policy against 60-150 ms
with passive waiting (benchmarks/RESULTS.md). Passive threads sleep instead of spinning.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# Any of these set by the user means they chose a policy; we leave it alone.
_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def configure_openmp() -> bool:
    """Makes OpenMP threads wait passively unless the user chose otherwise. Returns whether it did.

    Must run before `torch` is imported: libgomp reads its environment once, when it is loaded."""
    if "torch" in sys.modules or any(knob in os.environ for knob in _USER_KNOBS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


# Steps doing at most this many multiply-adds in their linear layers run on one thread while OpenMP threads
# wait passively. A sleeping thread takes 50-100 us to wake on the 2-vCPU VM, and a step runs a few hundred
# parallel regions, so a small step lost more to waking its partner than splitting its work saved: the
# default model's decode step (about 1.3e8 multiply-adds a row) measured 19-20 ms on one thread against
# 26-32 ms on two at 1 row, 23-32 against 31-35 at 2 rows, even at 8 rows, and two threads won from 16
# rows (benchmarks/RESULTS.md). Bigger models cross the bound at fewer rows: a 7B model never does.
SINGLE_THREAD_MAX_MACS = 6 * 10**8


def waits_passively() -> bool:
    """Whether this process's OpenMP threads sleep between parallel regions (our default)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


class StepThreads:
    """Runs small CPU steps on one thread while threads wait passively (see SINGLE_THREAD_MAX_MACS); other
    steps keep the configured count. The count is lowered for the step and restored after it, so engines
    sharing a process (benchmarks, tests) never see each other's choice."""

    def __init__(self, macs_per_row: int) -> None:
        self.macs_per_row = macs_per_row
        self.enabled = waits_passively()

    def single_thread(self, num_rows: int) -> bool:
        return self.enabled and num_rows * self.macs_per_row <= SINGLE_THREAD_MAX_MACS

    @contextlib.contextmanager
    def step(self, num_rows: int) -> Iterator[None]:
        """Around one step of num_rows rows (a torch.set_num_threads call costs well under a microsecond)."""
        import torch

        configured = torch.get_num_threads()
        if configured == 1 or not self.single_thread(num_rows):
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(configured)
