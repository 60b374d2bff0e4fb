"""The engine process makes OpenMP threads wait passively unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A fresh interpreter, as an engine process starts: the policy must be in place before torch loads.
PROBE = """
import os, sys
from engine.cpu_threads import configure_openmp
changed = configure_openmp()
import torch
torch.ones(1)  # loads libgomp
print(changed, os.environ.get("OMP_WAIT_POLICY"), configure_openmp())
"""


def _probe(**env: str) -> str:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout.strip()


def test_passive_by_default_and_too_late_once_torch_is_loaded() -> None:
    assert _probe() == "True PASSIVE False"


@pytest.mark.parametrize(("knob", "value"), [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10000")])
def test_a_policy_the_user_set_is_kept(knob: str, value: str) -> None:
    expected_policy = value if knob == "OMP_WAIT_POLICY" else "None"
    assert _probe(**{knob: value}) == f"False {expected_policy} False"


def test_the_engine_entry_point_loads_torch_only_after_setting_the_policy() -> None:
    # run_engine calls configure_openmp first; that only works while importing it has not loaded torch.
    code = "import sys, tandem.cli, engine.main; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
