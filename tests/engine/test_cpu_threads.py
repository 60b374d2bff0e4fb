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


def test_small_steps_run_on_one_thread_and_the_count_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from engine.cpu_threads import SINGLE_THREAD_MAX_MACS, StepThreads

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = StepThreads(macs_per_row=SINGLE_THREAD_MAX_MACS // 4)
        seen = []
        for rows in (1, 4, 5, 64):
            with threads.step(rows):
                seen.append(torch.get_num_threads())
            assert torch.get_num_threads() == 2  # restored after every step
        assert seen == [1, 1, 2, 2]
        # A step that raises still gets the count back.
        with pytest.raises(RuntimeError), threads.step(1):
            raise RuntimeError("step failed")
        assert torch.get_num_threads() == 2
        # Spinning threads (a policy the user chose) keep the configured count.
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        assert not StepThreads(1).single_thread(1)
    finally:
        torch.set_num_threads(previous)


def test_the_default_models_steps_of_up_to_25_rows_take_one_thread(
    monkeypatch: pytest.MonkeyPatch, default_loaded_model: object
) -> None:
    import torch

    from engine.engine_setup import _step_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    model = default_loaded_model.model  # type: ignore[attr-defined]
    threads = _step_threads(model, torch.device("cpu"))
    assert threads is not None
    # About 1.35e8 multiply-adds a row: the 30 layers' projections and the 49,152 x 576 LM head.
    assert 1.3e8 < threads.macs_per_row < 1.4e8
    assert [threads.single_thread(rows) for rows in (1, 16, 25, 26, 64)] == [True, True, True, False, False]
    assert _step_threads(model, torch.device("cuda")) is None
