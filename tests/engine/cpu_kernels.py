"""Test helper: the C kernels of engine/kernels/cpu_quant.c, which tests of them need built."""

from __future__ import annotations

import os
import shutil

import pytest

from engine.kernels import cpu_quant


def require_cpu_kernels() -> None:
    """Fails when a C compiler is here and the kernels still did not build (a defect); skips only on a host
    without any C compiler, where the engine runs its dense torch path by design (that path is tested by
    test_gguf_packed.test_without_a_compiler_the_model_keeps_its_dense_path)."""
    if cpu_quant.library() is not None:
        return
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this host: the CPU kernels cannot be built here")
    pytest.fail(
        "a C compiler is here but the CPU kernels did not build (see the engine.kernels.cpu_quant log)"
    )
