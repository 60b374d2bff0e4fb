"""Builds and calls the CPU kernels: cpu_quant.c (integer products against GGUF block-quantized weights),
cpu_exact.c (their exact float32 products) and cpu_ops.c (RMSNorm, rotary, SiLU-and-multiply, the KV cache
write and paged attention for float32 rows, used through engine/kernels/cpu_ops.py).

Why a C file of our own: on CPU a decode step reads every weight once and does little arithmetic with each,
and torch has no kernel that multiplies GGUF's 4-bit blocks directly (its int4/int8 weight-only ops ran the
default model's layers only 1.1-1.9x faster than bf16 at one row; benchmarks/RESULTS.md). The file is
small, has no torch headers and compiles in about a second with the system C compiler, as Triton builds
its launchers. It is compiled once per CPU kind and source version, cached (systemd's CacheDirectory=,
else the user's cache directory, else the temp directory) and loaded with ctypes, which releases the GIL
during the call. Without a compiler, or on a CPU without AVX2/FMA/F16C, `library()` returns None and the
engine keeps its dense torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_quant.c", "cpu_exact.c", "cpu_ops.c")]
HEADERS = [Path(__file__).with_name("cpu_simd.h")]
# -ffp-contract=off: arithmetic as written (no fused multiply-adds the source does not ask for), so the
# activation rounding is reproducible outside C (tests/engine/test_gguf_packed.py).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
BLOCK = 32  # weights per quantization block


def _cache_dirs() -> list[Path]:
    """Where the built library may live, in order: systemd's CacheDirectory= (deploy/systemd, whose unit
    hides /home), the XDG cache, ~/.cache, and last a per-user folder in the temp directory."""
    roots = []
    if os.environ.get("CACHE_DIRECTORY"):
        roots.append(Path(os.environ["CACHE_DIRECTORY"].split(":")[0]))
    if os.environ.get("XDG_CACHE_HOME"):
        roots.append(Path(os.environ["XDG_CACHE_HOME"]) / "tandem")
    roots.append(Path(os.path.expanduser("~")) / ".cache" / "tandem")
    roots.append(Path(tempfile.gettempdir()) / f"tandem-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return [root / "kernels" for root in roots]


def _cpu_identity() -> str:
    """The CPU model and feature flags: -march=native compiles for exactly these."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("flags", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: engines starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-lm", "-o", str(built)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)


def _built(compiler: str, name: str) -> Path:
    """The library's path, built into the first cache folder that can be written to if none has it;
    raises the last folder's OSError when none can."""
    folders = _cache_dirs()
    for folder in folders:
        if (folder / name).exists():
            return folder / name
    error = OSError(f"no cache folder for {name}")
    for folder in folders:
        try:
            _compile(compiler, folder / name)
            return folder / name
        except OSError as exc:  # not writable here (read-only home, ProtectHome=): try the next one
            error = exc
    raise error


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler found: GGUF weights run through dense torch matmuls")
        return None
    key = hashlib.sha256(
        b"".join(path.read_bytes() for path in SOURCES + HEADERS)
        + " ".join([compiler, *FLAGS]).encode()
        + _cpu_identity().encode()
    ).hexdigest()[:16]
    try:
        lib = ctypes.CDLL(str(_built(compiler, f"cpu_quant-{key}.so")))
    except subprocess.CalledProcessError as exc:
        logger.warning(
            "GGUF CPU kernels not built (%s): dense torch matmuls instead", exc.stderr.strip()[:300]
        )
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("GGUF CPU kernels not available (%s): dense torch matmuls instead", exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tandem_block_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    lib.tandem_block_matmul.restype = ctypes.c_int
    lib.tandem_u4_matmul_exact.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr]
    lib.tandem_u4_matmul_exact.restype = None
    lib.tandem_i8_matmul_exact.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr]
    lib.tandem_i8_matmul_exact.restype = None
    lib.tandem_block_vnni.argtypes = []
    lib.tandem_block_vnni.restype = ctypes.c_int
    lib.tandem_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, i64, i64, ptr, ptr]
    lib.tandem_rms_norm.restype = None
    lib.tandem_rotary_neox.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr]
    lib.tandem_rotary_neox.restype = None
    # q, T, Hq, Hkv, D, cache, is_f16, half, block_size, block_table, bt_stride, token_seq, token_len, scale, out
    attention: list[Any] = [ptr, i64, i64, i64, i64, ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, ptr]
    lib.tandem_paged_attention.argtypes = [*attention, ctypes.c_float, ptr]
    lib.tandem_paged_attention.restype = ctypes.c_int
    lib.tandem_silu_and_mul.argtypes = [ptr, i64, i64, ptr]
    lib.tandem_silu_and_mul.restype = None
    lib.tandem_write_kv.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ctypes.c_int, i64, ptr]
    lib.tandem_write_kv.restype = None
    return lib


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "the kernels are not built: check library() before calling them"
    return lib


# The calls of the CPU-graph capture in progress in this thread (engine/cpu_graphs.py), if any: per
# thread, so an engine capturing in one thread never records another thread's kernels.
_capture = threading.local()


def _call(name: str, *args: Any) -> None:
    """Runs one kernel; records it while a CPU graph is captured. Kernels that allocate scratch return
    nonzero when they could not."""
    fn = getattr(_lib(), name)
    if fn(*args):
        raise MemoryError(f"{name}: no memory for its scratch")
    calls = getattr(_capture, "calls", None)
    if calls is not None:
        calls.append((fn, args))


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, tuple[Any, ...]]]]:
    """Records every kernel call this thread makes inside it (the calls run as usual), for `replay`."""
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    _capture.calls = calls
    try:
        yield calls
    finally:
        _capture.calls = None


def replay(calls: list[tuple[Any, tuple[Any, ...]]]) -> None:
    """Runs recorded calls again, in order, on whatever their buffers now hold."""
    for fn, args in calls:
        if fn(*args):
            raise MemoryError("a CPU kernel found no memory for its scratch")


def _bias_ptr(bias: Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


def has_vnni() -> bool:
    """Whether the built block products use AVX-512 VNNI (else AVX2)."""
    return bool(_lib().tandem_block_vnni())


def block_matmul(
    x: Tensor, q: Tensor, scales: Tensor, offsets: Tensor | None, n: int, bias: Tensor | None = None
) -> Tensor:
    """x [T, K] float32 contiguous @ W^T -> [T, n] float32. W in cpu_quant.c's g16 layout (made by
    engine/layers/gguf_packed.py): q uint8, scales and offsets (None for int8 weights) float16
    [ceil(n / 16), K / 32, 16]; bias [n] float32 or None."""
    rows, k = x.shape
    out = torch.empty(rows, n, dtype=torch.float32)
    _call(
        "tandem_block_matmul",
        x.data_ptr(),
        rows,
        k,
        q.data_ptr(),
        scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(),
        n,
        _bias_ptr(bias),
        out.data_ptr(),
    )
    return out


def u4_matmul_exact(
    x: Tensor, q: Tensor, scales: Tensor, offsets: Tensor, bias: Tensor | None = None
) -> Tensor:
    """x [T, K] float32 contiguous @ W^T -> [T, N] float32 in float32 arithmetic (cpu_exact.c), W[n, k] =
    scales * nibble + offsets per block; q [N, K / 2] uint8 (GGUF's order), scales and offsets [N, K / 32]
    float32, bias [N] float32 or None."""
    rows, k = x.shape
    n = q.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    block_sums = torch.empty(rows, k // BLOCK, dtype=torch.float32)
    args = (x.data_ptr(), rows, k, q.data_ptr(), scales.data_ptr(), offsets.data_ptr(), n, _bias_ptr(bias))
    _call("tandem_u4_matmul_exact", *args, block_sums.data_ptr(), out.data_ptr())
    return out


def i8_matmul_exact(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [T, K] float32 contiguous @ W^T -> [T, N] float32 in float32 arithmetic (cpu_exact.c), W[n, k] =
    scales * q per block; q [N, K] int8, scales [N, K / 32] float32, bias [N] float32 or None."""
    rows, k = x.shape
    n = q.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    args = (x.data_ptr(), rows, k, q.data_ptr(), scales.data_ptr(), n, _bias_ptr(bias), out.data_ptr())
    _call("tandem_i8_matmul_exact", *args)
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [T, H] float32 contiguous (plus residual, same layout) -> (rms_norm(s) * weight, s), where s is x
    or x + residual (then a new tensor)."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    _call(
        "tandem_rms_norm",
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        eps,
        rows,
        hidden,
        out.data_ptr(),
        None if residual is None else summed.data_ptr(),
    )
    return out, summed


def rotary_neox(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """q [T, Hq, D], k [T, Hk, D] float32, each head's D floats contiguous (tokens may be strided, as views
    of the merged qkv output); positions [T] int64; cos_sin_cache [P, rot] float32 -> new contiguous q, k."""
    tokens, q_heads, head_dim = q.shape
    rot = cos_sin_cache.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype)
    k_out = torch.empty(k.shape, dtype=k.dtype)
    _call(
        "tandem_rotary_neox",
        positions.data_ptr(),
        tokens,
        q.data_ptr(),
        q.stride(0),
        q_heads,
        k.data_ptr(),
        k.stride(0),
        k.shape[1],
        head_dim,
        cos_sin_cache.data_ptr(),
        rot,
        q_out.data_ptr(),
        k_out.data_ptr(),
    )
    return q_out, k_out


def paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    token_len: Tensor,
    scale: float,
    token_seq: Tensor | None = None,
) -> Tensor:
    """Causal attention of T query tokens over the paged cache: q [T, Hq, D] float32 contiguous, kv_cache
    [2, num_blocks, block_size, Hkv, D] float16 or float32 contiguous, block_table [B, max_blocks] int32
    (rows contiguous); token t reads block_table row token_seq[t] (int32 [T]; None: row t) and attends to
    its sequence's first token_len[t] positions (int32 [T]; 0: zeros out) -> [T, Hq, D] float32."""
    tokens, q_heads, head_dim = q.shape
    _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
    if token_len.numel() != tokens or (token_seq is not None and token_seq.numel() != tokens):
        raise ValueError(f"{tokens} query tokens need {tokens} lengths and sequence indices")
    out = torch.empty(q.shape, dtype=torch.float32)
    _call(
        "tandem_paged_attention",
        q.data_ptr(),
        tokens,
        q_heads,
        kv_heads,
        head_dim,
        kv_cache.data_ptr(),
        int(kv_cache.dtype == torch.float16),
        num_blocks * block_size * kv_heads * head_dim,
        block_size,
        block_table.data_ptr(),
        block_table.stride(0),
        None if token_seq is None else token_seq.data_ptr(),
        token_len.data_ptr(),
        scale,
        out.data_ptr(),
    )
    return out


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] float32 contiguous, I a multiple of 16 -> silu(x[:, :I]) * x[:, I:] [T, I]."""
    tokens, width = x.shape
    out = torch.empty(tokens, width // 2, dtype=torch.float32)
    _call("tandem_silu_and_mul", x.data_ptr(), tokens, width // 2, out.data_ptr())
    return out


def write_kv(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v [T, Hkv, D] float32 (each token's heads contiguous, tokens may be strided) into kv_cache
    [2, num_blocks, block_size, Hkv, D] float16 or float32 contiguous at slot_mapping [T] int64."""
    tokens, kv_heads, head_dim = k.shape
    _call(
        "tandem_write_kv",
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        tokens,
        kv_heads,
        head_dim,
        kv_cache.data_ptr(),
        int(kv_cache.dtype == torch.float16),
        kv_cache[0].numel(),
        slot_mapping.data_ptr(),
    )
