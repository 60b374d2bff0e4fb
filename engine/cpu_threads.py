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
# wait passively. A sleeping thread takes 50-100 us to wake on the 2-vCPU VMs, and a step runs a few hundred
# parallel regions, so a small step loses more to waking its partner than splitting its work saves. With the
# C kernels (the default model's GGUF on a Zen 5 VM, a whole step timed with 80 cached tokens of context,
# benchmarks/RESULTS.md) one thread took 7.0 / 12.2 / 18.2 / 25.1 ms at 1 / 8 / 14 / 24 rows against 11.4 /
# 18.5 / 20.6 / 32.3 on two; 32 rows tied (30.4 / 29.5) and two threads won from 48 rows (37.1 against 44.5).
# At about 1.35e8 multiply-adds a row that puts the bound at 25 rows; a 1B model (about 1e9 a row) crosses
# it at 4 rows, a 7B model never takes one thread.
SINGLE_THREAD_MAX_MACS = 34 * 10**8


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
