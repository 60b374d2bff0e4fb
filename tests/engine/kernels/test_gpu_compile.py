"""Every Triton kernel compiles for sm_80 and sm_90 (to a cubin, with ptxas) without a GPU, within the
target's shared memory and without register spills. The interpreted tests check the arithmetic; this
checks what only the real compiler can reject."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.engine.kernels.gpu_compile_check import SHARED_LIMIT

KERNELS = {
    "_paged_attention_kernel",
    "_split_kv_decode_kernel",
    "_split_kv_reduce_kernel",
    "_rms_norm_kernel",
    "_silu_and_mul_kernel",
    "_rotary_kernel",
    "_write_kv_kernel",
}
ROOT = Path(__file__).resolve().parents[3]


def test_every_kernel_compiles_for_ampere_and_hopper(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    report = tmp_path / "compiled.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.kernels.gpu_compile_check", "--json", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(report.read_text())
    for arch in (80, 90):
        compiled = {r["kernel"] for r in results if r["arch"] == arch}
        assert compiled == KERNELS, f"sm_{arch}: compiled {sorted(compiled)}"
    for r in results:
        assert 0 <= r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
        assert r["spill_bytes"] == 0, f"registers spill: {r}"
        assert r["registers"] <= 255, r
    # Every dtype the engine runs on a GPU went through the attention kernels.
    cases = " ".join(r["case"] for r in results if r["kernel"] == "_paged_attention_kernel")
    for dtype in ("bfloat16", "float16", "float32"):
        assert f"attention {dtype}" in cases
