"""Runs the Triton kernels through the interpreter on CPU when no CUDA device is present.

TRITON_INTERPRET must be set before any @triton.jit decorates, i.e. before the kernel modules are imported,
which is why this happens at import time of the conftest rather than in a fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(
    params=[
        # The interpreter runs kernels on CPU tensors; with a GPU present (interpreter off) this variant skips.
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 not set")),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available() or INTERPRET, reason="needs CUDA with the interpreter off"
                ),
            ],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """The device kernels run on: CPU under the interpreter, or CUDA (tests marked gpu)."""
    return request.param
