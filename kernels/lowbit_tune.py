"""Launch configs of the low-bit kernels (kernels/lowbit.py): the per-GPU tables and the tuner
that fills them from the candidate lists of kernels/lowbit_candidates.py.

Configs: a JSON table keyed by GPU name then by "kind|bits,group,N,K,M-bucket" (shipped in
kernels/lowbit_configs.json: the benchmark's shapes on an H100 80GB HBM3 and an H200, triton 3.6; on
the H200 also the Llama-8B k/v shape 1024x4096 that the decode benchmark tuned, and at M=1 and 16 the
fused q|k|v 6144x4096 and gate|up 28672x4096 of slimforge/fused_projections.py) and a per-user
cache ($SLIMFORGE_CACHE or ~/.cache/slimforge, file lowbit_configs.json) that a shape missing from
both fills on first use by timing a short candidate list (gpu_time_us: cold L2, launch cost
hidden). SLIMFORGE_LOWBIT_TUNE=0 skips tuning (heuristic config); nothing is tuned during CUDA-graph
capture. The fused low-rank variant has entries of its own (key suffix |lr), and so has a GEMM on
bf16 x (suffix |bf16, after |lr; the other kinds share fp16's entries). A GEMM config may carry
FIELDS (1, 2: the per-field kernel, kernels/lowbit_tiles.py _fields_tile; 3: _fields_words_tile; absent or 0: the plain one), MMA (3, the default: wgmma
where triton picks it; 2: mma.sync), NT (1: the un-swapped product, _dequant_kn) and HALF2 (0 turns
off the half2 dequantisation that FIELDS 1/2 and NT use for fp16 x; tuned with it on). A forward
config may carry `maxnreg` (Triton's register cap); none shipped does: on the H200 it did not speed up the M=1 GEMV (benchmarks/2026-11-30-h200-lowbit-gemv-maxnreg-negative.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kernels.lowbit_candidates import (CANDIDATES, _dx_candidates, _fields_candidates,  # noqa: F401 (re-exported)
                                       _gemm_candidates, _gemv_candidates, _nt_candidates, pow2)

_SHIPPED = Path(__file__).with_name("lowbit_configs.json")
_USER = Path(os.environ.get("SLIMFORGE_CACHE", "~/.cache/slimforge")).expanduser() / "lowbit_configs.json"
_TABLES: dict[str, dict[str, dict]] | None = None
OVERRIDE: dict[str, dict] = {}  # kind -> config; tests force split-K etc. through this


def tables() -> dict[str, dict[str, dict]]:
    global _TABLES
    if _TABLES is None:
        _TABLES = {}
        for path in (_SHIPPED, _USER):  # user entries win
            if path.exists():
                for gpu, entries in json.loads(path.read_text()).items():
                    _TABLES.setdefault(gpu, {}).update(entries)
    return _TABLES


def _remember(gpu: str, key: str, cfg: dict) -> None:
    tables().setdefault(gpu, {})[key] = cfg
    try:
        data = json.loads(_USER.read_text()) if _USER.exists() else {}
        data.setdefault(gpu, {})[key] = cfg
        _USER.parent.mkdir(parents=True, exist_ok=True)
        _USER.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError:  # a read-only home still gets the in-memory entry
        pass


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_INTERPRETER_CONFIGS = {  # small tiles: the interpreter's cost grows with the tile
    "gemv": dict(BLOCK_N=8, BLOCK_KW=8, SPLIT_K=2, num_warps=4, num_stages=1),
    "gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1),
    "dx": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1),
}


def _mbucket(kind: str, M: int) -> int:
    return pow2(M) if kind == "gemv" else min(pow2(M), 1024)


def config_key(kind: str, M: int, N: int, K: int, bits: int, group: int) -> str:
    return f"{kind}|b{bits}g{group}n{N}k{K}m{_mbucket(kind, M)}"


def config_for(kind: str, M: int, N: int, K: int, bits: int, group: int, device: torch.device, launch,
               variant: str = "") -> dict:
    """The config for this launch: override > table > tune (CUDA) > heuristic. `launch(cfg)` runs it.

    variant "|lr" (the fused low-rank kernel) has entries of its own: its t-programs take their
    shape from num_warps, so its best config is not the plain kernel's (on an H200 the plain W2
    GEMV's 1-warp pick cost the 8B W2 + rank-64 model 8% of its decode speed). So has "|bf16" (a
    GEMM on bf16 x, which takes the fp32 dequantisation route where fp16 takes half2: the tiles
    tuned with half2 cost bf16 up to 16% in a CUDA graph). Where a variant cannot be tuned
    (CUDA-graph capture, SLIMFORGE_LOWBIT_TUNE=0) it falls back to the nearest entry: key|lr for
    key|lr|bf16, then the plain key."""
    if kind in OVERRIDE:
        return OVERRIDE[kind]
    if device.type != "cuda":
        return _INTERPRETER_CONFIGS[kind]
    gpu, key = torch.cuda.get_device_name(device), config_key(kind, M, N, K, bits, group)
    table = tables().get(gpu, {})
    hit = table.get(key + variant)
    if hit is not None:
        return hit
    candidates = CANDIDATES[kind](M, N, K, bits, _sm_count(device), group)
    tune_off = os.environ.get("SLIMFORGE_LOWBIT_TUNE", "1") == "0"
    if variant and (tune_off or torch.cuda.is_current_stream_capturing()):
        for nearer in (key + variant.replace("|bf16", ""), key):
            if nearer in table:
                return table[nearer]
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    if tune_off:
        best = first_that_runs(candidates, launch)
        tables().setdefault(gpu, {})[key + variant] = best  # this process only: an untimed pick is not a tuning
        return best
    best = tune(candidates, launch)
    _remember(gpu, key + variant, best)
    return best


def first_that_runs(candidates: list[dict], launch) -> dict:
    """The most promising candidate that fits this GPU (big tiles at large M can ask for more shared
    memory than the device has), without timing: for SLIMFORGE_LOWBIT_TUNE=0."""
    for cfg in candidates:
        try:
            launch(cfg)
            return cfg
        except Exception:  # noqa: BLE001 -- out of shared memory / registers: try the next
            continue
    raise RuntimeError("no low-bit kernel config ran on this device")


TUNE_LOG: list[list[tuple[float, dict]]] = []  # every tuning's (us, config) list, fastest first


_FLUSH: torch.Tensor | None = None


def gpu_time_us(fn, reps: int, flush: torch.Tensor | None = None) -> float:
    """Median microseconds of fn() on a cold L2 with its host launch cost hidden: before each call a
    256 MB buffer is zeroed (the H100's L2 is 50 MB) and the GPU spins ~0.5 ms (torch.cuda._sleep)
    while the host launches, so the CUDA events bracket the GPU work alone. (With a ~100 us spin
    the unfused correction's four launches, and the first rows of runs on a fresh or busy machine,
    read 2-10x slow: the host had not finished launching when the spin ended.) triton's do_bench
    times back-to-back launches: for ~10 us kernels that is the launcher's host time, and it ranked
    the M=1 GEMV configs wrongly (benchmarks/2026-11-30-h200-lowbit-gemv-grid.json)."""
    global _FLUSH
    if flush is None:
        if _FLUSH is None:
            _FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        flush = _FLUSH
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(1_000_000)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000 for s, e in events)
    return times[len(times) // 2]


def tune(candidates: list[dict], launch, reps: int = 15) -> dict:
    """Fastest candidate by median time in gpu_time_us (cold L2, launch cost hidden)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # freed with the tuning
    runs = []
    for cfg in candidates:  # compile them all first, so that the timings run back to back
        try:
            launch(cfg)
            runs.append(cfg)
        except Exception:  # noqa: BLE001 -- a config that does not compile/fit is skipped
            continue
    timed = [(gpu_time_us(lambda: launch(cfg), reps, flush), cfg) for cfg in runs]
    if not timed:
        raise RuntimeError("no low-bit kernel config ran on this device")
    TUNE_LOG.append(sorted(timed, key=lambda tc: tc[0]))
    return min(timed, key=lambda tc: tc[0])[1]
