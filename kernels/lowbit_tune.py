"""Launch configs of the low-bit kernels (kernels/lowbit.py): candidate lists per kernel kind,
the per-GPU tables, and the tuner that fills them.

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
import math
import os
from pathlib import Path

import torch

def pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


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


def _gemv_candidates(M, N, K, bits, sms, group=128):
    """All threads of a program lie along K (BLOCK_KW = 32 * LO * warps: one unit of LO words
    per thread and row): a narrower tile puts warps along N and costs a shared-memory layout
    conversion per tile. Fewer warps = more iterations per program. Each launch shape comes with
    and without the hand prefetch (PREFETCH): without, the program holds half the words and more
    warps fit on an SM; on an H200 that won at M=1 on 14336x4096 W4 by 24%
    (benchmarks/2026-11-30-h200-lowbit-gemv-grid.json)."""
    lo = 2 if bits == 3 else bits
    kw = K * lo // 32
    out = []
    for warps in (1, 2, 4, 8):
        bkw = 32 * lo * warps
        if bkw > max(32 * lo, kw):
            continue
        for bn in (4, 8, 16):
            for split in (1, 2, 4, 8):
                iters = kw / split / bkw
                progs = M * math.ceil(N / bn) * split
                if (split == 1 or iters >= 1) and sms <= progs <= 32 * sms:
                    out.append(dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps, num_stages=1))
    # most promising first: ~4 programs per SM with at least 2 tiles each, little split
    def rank(c):
        progs = M * math.ceil(N / c["BLOCK_N"]) * c["SPLIT_K"]
        iters = kw / c["SPLIT_K"] / c["BLOCK_KW"]
        return abs(math.log2(progs * c["num_warps"] / (16 * sms))) + (iters < 2) + 0.25 * math.log2(c["SPLIT_K"])
    out.sort(key=rank)
    out = [dict(c, PREFETCH=p) for c in out[:12] for p in (True, False)]
    return out or [dict(BLOCK_N=4, BLOCK_KW=32 * lo, SPLIT_K=1, num_warps=1, num_stages=1, PREFETCH=True)]


def _gemm_candidates(M, N, K, bits, sms, group=128):
    """The dequantisation, not the MMA, bounds this kernel at M <= 64, so it wants many small
    programs in flight: on an H200 the best tiles at M = 8..16 were 16 x 16 (M x N) with 2 warps
    and split-K 2..16, 20-25% faster than the 16 x 128 / 4-warp tiles this list used to end at
    (benchmarks/2026-11-30-h200-lowbit-small-m-grid.json).

    Up to M = 32, 2- and 4-bit: also the per-field GEMM (FIELDS, one scale per row and MMA), whose
    packed tile crosses shared memory once; its best tiles are 64-128 rows of W and 4-8 warps
    (wgmma), split-K 1-8: on an H200 W4 M=16 0.96-1.06x cuBLAS where the plain GEMM gave 0.62-0.79x
    (benchmarks/2026-11-30-h200-lowbit-fields.json). 3-bit is left out: its high-bit plane keeps
    triton from loading into the MMA layout, and it measured no faster."""
    vpw = 16 if bits in (2, 3) else 8
    out = []
    for bm in (16, 32, 64, 128):
        if bm > max(16, pow2(M)):
            continue
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256):
                if bk // vpw < 4:  # at least one 16-byte vector of words per row
                    continue
                for split in (1, 2, 4, 8, 16):
                    tiles = math.ceil(N / bn) * math.ceil(M / bm)
                    if split > 1 and (tiles * split > 16 * sms or K / split < 2 * bk):
                        continue
                    for warps in (2, 4, 8):
                        if (warps == 8 and bn * bm < 64 * 64) or (warps == 2 and bn * bm > 64 * 16):
                            continue
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3))
    big = max(16, min(128, pow2(M)))
    per_sm = 8 if M <= 16 else 2  # programs per SM to aim for

    def rank(c):
        progs = math.ceil(N / c["BLOCK_N"]) * math.ceil(M / c["BLOCK_M"]) * c["SPLIT_K"]
        return (round(abs(math.log2(progs / (per_sm * sms)))), c["BLOCK_M"] != big, c["num_warps"] != (2 if M <= 16 else 4),
                -c["BLOCK_K"])
    out.sort(key=rank)
    return out[:14] + _fields_candidates(M, N, K, bits, sms, group) + _nt_candidates(M, N, K, bits, sms, group)


def _nt_candidates(M, N, K, bits, sms, group):
    """From M = 17: the un-swapped GEMM (NT: x the MMA's A operand, the k-major dequantised tile B,
    both in shared memory, so wgmma need not wait on a register operand). On an H200 at M = 64 its
    best tiles were 64 x 64-128 (M x N), BLOCK_K 128, split-K 1-4, ~2 programs per SM: W4 0.72-0.79x
    cuBLAS where the swapped GEMM gave 0.46-0.56x; at M = 128 it tied dequantise + cuBLAS (0.48-0.55x
    vs 0.48-0.63x), at 256 and 1024 it loses (0.3-0.5x): benchmarks/2026-12-01-h200-lowbit-nt-gemm.json.
    With half2 dequantisation (fp16, BLOCK_K <= group) it wins at M = 128 on an H200, where the GEMM
    kind now runs up to 128 (kernels.lowbit.DEQUANT_MIN_M_BY_GPU; benchmarks/2026-12-01-h200-lowbit-half2.json)."""
    if pow2(M) < 32:
        return []
    out = []
    for bm in sorted({min(64, pow2(M)), min(128, pow2(M))}):
        for bn in (32, 64, 128):
            for bk in (128, 256):
                for split in (1, 2, 4, 8):
                    if sms <= math.ceil(N / bn) * math.ceil(M / bm) * split <= 4 * sms and K / split >= 2 * bk:
                        out += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3, NT=1)
                                for warps in (4, 8)]
    progs = lambda c: math.ceil(N / c["BLOCK_N"]) * math.ceil(M / c["BLOCK_M"]) * c["SPLIT_K"]
    out.sort(key=lambda c: (abs(math.log2(progs(c) / (2 * sms))), c["BLOCK_K"], c["BLOCK_M"] != min(64, pow2(M))))
    return out[:16] + [dict(c, num_stages=2) for c in out[:8]]  # 2 stages: -5-7% on two 8B shapes, W4 M=64


def _fields_candidates(M, N, K, bits, sms, group):
    """FIELDS 1 and 2 (units of 8 fields, one group per 128-wide tile) need group 128; FIELDS 3
    (32-bit words, one MMA per field and group) takes 4-bit at groups 32 and 64, where on an H200 it
    beat every plain candidate (W4 g64 M=16 0.67-0.80x cuBLAS). At 2 bits it never won at g128
    and was not timed at smaller groups, so it is left out there (it runs when a config names it).
    benchmarks/2026-11-30-h200-lowbit-fields3.json.

    Each comes with wgmma (MMA 3) and with mma.sync (MMA 2, kernels/lowbit_launch.py _mma_version): at
    M=16 on an H200 the best mma.sync tile beat the best wgmma one by 3-20% at W2 and -2% to +7% at W4
    (benchmarks/2026-11-30-h200-lowbit-mma-v2.json)."""
    if bits == 3 or pow2(M) > 32:
        return []
    variants = [(3, 128)] if bits == 4 and group < 128 else []
    if group == 128:
        variants += [(1, 128)] + ([(2, 128)] if bits == 2 else [])  # 2-bit half-words: x gathered, or reordered
    out = []
    for fields, bk in variants:
        for bm in sorted({16, max(16, pow2(M))}):
            for bn, warps in ((64, 4), (128, 4), (128, 8)):
                for split in (1, 2, 4, 8):
                    if math.ceil(N / bn) * math.ceil(M / bm) * split > 16 * sms or K / split < 2 * bk:
                        continue
                    for mma in (3, 2):
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3,
                                        FIELDS=fields, MMA=mma))
    return out


def _dx_candidates(M, N, K, bits, sms, group=128):
    out = []
    for bm in (128, 64, 32):
        if bm > max(32, pow2(M)):
            continue
        for bk in (64, 128):
            for bn in (32, 64):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bm * bk <= 64 * 64 else 8, num_stages=3))
    return out[:8]


CANDIDATES = {"gemv": _gemv_candidates, "gemm": _gemm_candidates, "dx": _dx_candidates}
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
