"""tandem serve gives each engine its own GPUs (tandem/gpu_placement.py): data-parallel engines and
tensor-parallel ranks never share a device unless the host has too few."""

from __future__ import annotations

import pytest

from tandem.gpu_placement import count_gpus, place_engines


def test_data_parallel_engines_get_one_gpu_each() -> None:
    assert place_engines(["auto", "auto"], [1, 1], num_gpus=2) == ["cuda:0", "cuda:1"]


def test_tensor_parallel_engines_get_consecutive_ranges() -> None:
    # Two TP=2 engines on a 4-GPU host, then a TP=4 engine on an 8-GPU host after them.
    assert place_engines(["auto", "cuda"], [2, 2], num_gpus=4) == ["cuda:0", "cuda:2"]
    assert place_engines(["auto", "auto", "auto"], [2, 2, 4], num_gpus=8) == ["cuda:0", "cuda:2", "cuda:4"]


def test_explicit_devices_are_kept_and_not_counted() -> None:
    assert place_engines(["cuda:3", "auto"], [1, 1], num_gpus=2) == ["cuda:3", "cuda:0"]
    assert place_engines(["cpu", "cpu"], [1, 1], num_gpus=2) is None


@pytest.mark.parametrize("num_gpus", [0, 1])
def test_too_few_gpus_leave_placement_alone(num_gpus: int) -> None:
    assert place_engines(["auto", "auto"], [1, 1], num_gpus=num_gpus) is None


def test_cuda_visible_devices_limits_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert count_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert count_gpus() == 0
