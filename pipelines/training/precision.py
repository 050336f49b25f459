"""`dtype: auto`: bf16 only where this machine runs it fast, decided from a measured matmul benchmark.

The CPUs behind "2 cores" differ: with AMX a bf16 matmul runs several times faster than fp32, while on an AVX2
CPU without AVX-512 (e.g. an AMD EPYC) bf16 falls back to slow paths and can be two orders of magnitude slower.
So the choice is made from a measurement, never from a CPU name:

- `matmul_peaks(device)`: GFLOP/s of a square fp32 and a bf16 matmul (warm-up, then timed repeats; the size
  grows until one product takes long enough to time, so a slow bf16 path costs about a second, not minutes),
  cached per machine in a small JSON file under `$SEARCHREL_CACHE/precision/` (default `<repo>/.cache`, as
  `pipelines.env` uses), keyed by the CPU model, its matmul-relevant flags, torch's CPU capability, the torch
  version, the thread count and the device.
- `resolve_dtype(requested, device)`: `"float32"`/`"bfloat16"` pass through; `"auto"` is bf16 on CUDA when
  `torch.cuda.is_bf16_supported()`, on a CPU when the measured bf16 peak is at least `BF16_MARGIN` times fp32's.
- `precision_choice(requested, device)`: the decision with both peaks, what a stage logs to MLflow
  (`PARAM_RESOLVED`, `METRIC_PEAK_FP32`, `METRIC_PEAK_BF16`) and what MFU is reported against
  (`peak_gflops(dtype)`: the peak of the chosen precision).

Pure torch: config modules must not import it (they import no ML library); drivers do, once, and hand the
resolved name to their workers so every rank uses the same precision.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import torch

from pipelines.env import REPO_ROOT
from pipelines.training.config import Dtype

DTYPE_CHOICES: tuple[str, ...] = get_args(Dtype)  # ("auto", "float32", "bfloat16")
# bf16 must beat fp32 by 20% on the matmul benchmark to be chosen: the benchmark is the best case for bf16
# (training adds fp32 master weights, casts and elementwise ops that gain less or nothing), so a small matmul
# gain does not pay for them; and run-to-run noise on shared cores (a few %) must not flip the choice between
# runs. On a CPU where both are about equal, fp32 is kept: `auto` must never be slower than fp32.
BF16_MARGIN = 1.2
PARAM_RESOLVED = "dtype_resolved"
METRIC_PEAK_FP32 = "peak_gflops_fp32"
METRIC_PEAK_BF16 = "peak_gflops_bf16"
# CPU flags that decide matmul speed per dtype (reported in /proc/cpuinfo); part of the cache key.
_CPU_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"})
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- the machine


def cache_dir() -> Path:
    """Where measured peaks are kept: `$SEARCHREL_CACHE/precision` (default `<repo>/.cache/precision`)."""
    return Path(os.environ.get("SEARCHREL_CACHE", REPO_ROOT / ".cache")) / "precision"


def device_type(device: str | torch.device = "cpu") -> str:
    """`"cpu"`, `"cuda"`, ...; `"auto"` is CUDA when this process sees a GPU, else the CPU."""
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def machine_key(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What the measured peaks depend on: the processor, the torch build, the thread count and the device."""
    kind = device_type(device)
    key: dict[str, Any] = {"version": _CACHE_VERSION, "device": kind, "torch": torch.__version__,
                           "threads": int(threads or torch.get_num_threads())}
    if kind == "cuda":
        index = torch.device(device).index if str(device) not in ("auto", "cuda") else None
        index = torch.cuda.current_device() if index is None else index
        key |= {"gpu": torch.cuda.get_device_name(index), "capability": list(torch.cuda.get_device_capability(index))}
    else:
        info = _cpuinfo()
        key |= {"cpu": info.get("model name") or platform.processor() or platform.machine(),
                "flags": sorted(_CPU_FLAGS & set((info.get("flags") or info.get("Features") or "").split())),
                "capability": torch.backends.cpu.get_cpu_capability()}
    return key


def _cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"matmul-peaks-{key['device']}-{digest}.json"


def _write_atomic(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def measure_matmul_gflops(dtype: torch.dtype, device: str | torch.device = "cpu", *, min_time_s: float = 0.1,
                          budget_s: float = 0.6, start_n: int = 128, max_n: int | None = None) -> tuple[float, int]:
    """(GFLOP/s, n) of the best timed n x n @ n x n product in `dtype` on `device`.

    The size doubles from `start_n` until one product takes `min_time_s` (or reaches `max_n`: 2048 on a CPU,
    8192 on a GPU), so a slow path is found in about a second; that size is then timed for `budget_s` (at least
    2 repeats), and the fastest repeat counts (the peak, least disturbed by neighbours on shared cores). A fast
    dtype ends at a larger size than a slow one (where a matmul runs closer to its peak); the gap this leaves
    is small against the 1.2x margin, and a same-size comparison would cost minutes where bf16 is slow."""
    dev = torch.device(device_type(device) if str(device) == "auto" else device)
    max_n = max_n or (8192 if dev.type == "cuda" else 2048)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t0

    with torch.inference_mode():
        n = start_n
        while True:
            a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
            b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
            once(a, b)  # warm-up: kernel selection, JIT, first-touch of the output
            elapsed = once(a, b)
            if elapsed >= min_time_s or n >= max_n:
                break
            n *= 2
        times = [elapsed]
        spent = elapsed
        while len(times) < 2 or spent < budget_s:
            times.append(once(a, b))
            spent += times[-1]
            if len(times) >= 200:
                break
    return 2.0 * n**3 / min(times) / 1e9, n


def matmul_peaks(device: str | torch.device = "cpu", threads: int | None = None, *,
                 refresh: bool = False) -> dict[str, float]:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s} of this machine, measured once and then read from the cache
    (`refresh` measures again). `threads`: torch threads while measuring (default: the process's)."""
    key = machine_key(device, threads)
    path = _cache_file(key)
    if not refresh:
        cached = read_cached_peaks(device, threads)
        if cached is not None:
            return cached
    with _threads(threads):
        measured = {name: measure_matmul_gflops(dt_, device) for name, dt_ in _NAMES.items()}
    peaks = {name: float(g) for name, (g, _) in measured.items()}
    _write_atomic(path, {"key": key, "peaks_gflops": peaks, "sizes": {k: n for k, (_, n) in measured.items()},
                         "measured_at": dt.datetime.now(dt.UTC).isoformat()})
    return peaks


def read_cached_peaks(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, float] | None:
    """The cached peaks of this machine, or None when none were measured (or the file is unreadable, or the
    device is a GPU this process cannot see: a driver without one that hands an explicit dtype to GPU workers)."""
    if device_type(device) == "cuda" and not torch.cuda.is_available():
        return None
    key = machine_key(device, threads)
    try:
        record = json.loads(_cache_file(key).read_text())
        if record.get("key") != key:
            return None
        return {name: float(record["peaks_gflops"][name]) for name in _NAMES}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def peak_gflops(dtype: str, device: str | torch.device = "cpu", threads: int | None = None) -> float:
    """The matmul peak of a resolved precision (`"float32"`/`"bfloat16"`): what MFU is reported against."""
    return matmul_peaks(device, threads)[_check_resolved(dtype)]


# ---------------------------------------------------------------------------------------------- the choice


def check_dtype(requested: str) -> str:
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    return requested


def _check_resolved(name: str) -> str:
    if name not in _NAMES:
        raise ValueError(f"a resolved dtype is one of {', '.join(_NAMES)}, got {name!r} (resolve 'auto' first)")
    return name


def resolve_dtype(requested: str, device: str | torch.device = "cpu", threads: int | None = None) -> str:
    """`"float32"` or `"bfloat16"` for `requested` on `device`: explicit names pass through; `"auto"` is bf16 on
    CUDA when the GPU supports it, on a CPU when its measured bf16 matmul peak is at least `BF16_MARGIN` times
    the fp32 one (measured once per machine, then cached), fp32 anywhere else."""
    if check_dtype(requested) != "auto":
        return requested
    kind = device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("dtype auto for a CUDA device needs a visible GPU in this process to check bf16 "
                             "support; set dtype to bfloat16 or float32 explicitly")
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if kind != "cpu":
        return "float32"
    peaks = matmul_peaks(device, threads)
    return "bfloat16" if peaks["bfloat16"] >= BF16_MARGIN * peaks["float32"] else "float32"


def precision_choice(requested: str, device: str | torch.device = "cpu", threads: int | None = None
                     ) -> dict[str, Any]:
    """The decision and what it rests on: `dtype_requested`, `dtype_resolved`, `device`, and the peaks
    `peak_gflops_fp32` / `peak_gflops_bf16` where known (always for `"auto"`; for an explicit dtype only when
    this machine's peaks are already cached, so an explicit choice never pays for the benchmark)."""
    resolved = resolve_dtype(requested, device, threads)
    peaks = matmul_peaks(device, threads) if requested == "auto" else read_cached_peaks(device, threads)
    out: dict[str, Any] = {"dtype_requested": requested, PARAM_RESOLVED: resolved, "device": device_type(device)}
    if peaks:
        out |= {METRIC_PEAK_FP32: peaks["float32"], METRIC_PEAK_BF16: peaks["bfloat16"]}
    return out


def describe(choice: dict[str, Any]) -> str:
    """One line for logs: `dtype auto -> float32 (matmul peaks: fp32 91 GFLOP/s, bf16 0.9 GFLOP/s)`."""
    text = f"dtype {choice['dtype_requested']} -> {choice[PARAM_RESOLVED]} on {choice['device']}"
    if METRIC_PEAK_FP32 in choice:
        text += (f" (matmul peaks: fp32 {choice[METRIC_PEAK_FP32]:,.1f} GFLOP/s, "
                 f"bf16 {choice[METRIC_PEAK_BF16]:,.1f} GFLOP/s)")
    return text
