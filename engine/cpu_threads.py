"""OpenMP wait policy for the engine's CPU threads, set before torch loads its OpenMP runtime.

torch's CPU wheel uses GNU OpenMP, whose threads spin for a while at the end of every parallel region.
A decode step runs hundreds of small parallel regions, and on a machine whose cores are shared (the API
process, other programs) a spinning thread burns the time slice its partner needs to finish: measured on
a loaded 2-core machine, one bf16 decode step took 1.1-2.9 s with the default policy against 60-150 ms
with passive waiting (benchmarks/RESULTS.md). Passive threads sleep instead of spinning.
"""

from __future__ import annotations

import os
import sys

# Any of these set by the user means they chose a policy; we leave it alone.
_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def configure_openmp() -> bool:
    """Makes OpenMP threads wait passively unless the user chose otherwise. Returns whether it did.

    Must run before `torch` is imported: libgomp reads its environment once, when it is loaded."""
    if "torch" in sys.modules or any(knob in os.environ for knob in _USER_KNOBS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
