"""Issue 19 probe: QLoRAM against LoRAM under activation checkpointing, with and without handing the
recompute's dequantised weight to the backward (kernels/lowbit_dequant.py, _RECOMPUTED), same run.

    python -m experiments.qloram_ckpt_reuse [--steps 20] [--json out.json] [--reverse | --interleave]

Models, batch and LoRA as stages.lora.bench_memory (1B shape, 50% pruned, batch 8 x 512, rank 16;
QLoRAM packs the pruned model to 4 bits); each row builds its model afresh and reports the median
step's tokens/s (after 3 warm-up steps) and the peak memory. "reuse off" swaps _RECOMPUTED for a
dict that drops what it is given, i.e. the previous behaviour (dequantise again for dx).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from kernels import lowbit_dequant
from slimforge.adapters import add_lora
from slimforge.config import PROJECTIONS
from stages.lora.bench_memory import build, llama32_1b_shape, measure, train_step


class _Dropping(dict):
    def __setitem__(self, key, value):
        pass


def interleaved(config, steps: int) -> list[dict]:
    """LoRAM and QLoRAM (W4) both held on the GPU with checkpointing; each round times one step of
    LoRAM, of QLoRAM with the reuse and of QLoRAM without, so drift of the host hits all three alike."""
    kept = lowbit_dequant._RECOMPUTED
    runs = {}
    for kind in ("loram", "qloram4"):
        model = add_lora(build(config, kind, 0.5), rank=16, alpha=32, targets=list(PROJECTIONS))
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[kind] = (model, opt)
    ids = torch.randint(0, config.vocab_size, (8, 512), device="cuda")
    plan = [("loram", True), ("qloram4", True), ("qloram4", False)]
    times = {p: [] for p in plan}
    for i in range(steps + 3):
        for kind, reuse in plan:
            model, opt = runs[kind]
            lowbit_dequant._RECOMPUTED = kept if reuse else _Dropping()
            torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, opt, ids)
            torch.cuda.synchronize()
            if i >= 3:
                times[(kind, reuse)].append(time.perf_counter() - start)
    lowbit_dequant._RECOMPUTED = kept
    loram = statistics.median(times[("loram", True)])
    return [dict(model=kind, checkpointing=True, reuse=reuse, interleaved=True, steps_s=t,
                 tokens_per_s=8 * 512 / statistics.median(t), vs_loram=loram / statistics.median(t))
            for (kind, reuse), t in times.items()]


def sequential(config, steps: int, reverse: bool) -> list[dict]:
    """One row per (model, checkpointing, reuse), each on a freshly built model, in turn."""
    kept = lowbit_dequant._RECOMPUTED
    rows = []
    plan = [("loram", True, True), ("qloram4", True, True), ("qloram4", True, False), ("loram", False, True),
            ("qloram4", False, True)]
    for kind, ckpt, reuse in plan[::-1] if reverse else plan:
        lowbit_dequant._RECOMPUTED = kept if reuse else _Dropping()
        model = build(config, kind, 0.5)
        rows.append(dict(model=kind, checkpointing=ckpt, reuse=reuse, **measure(model, 8, 512, steps, 16, ckpt)))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    lowbit_dequant._RECOMPUTED = kept
    base = {r["checkpointing"]: r["tokens_per_s"] for r in rows if r["model"] == "loram"}
    for r in rows:
        r["vs_loram"] = r["tokens_per_s"] / base[r["checkpointing"]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--reverse", action="store_true", help="run the rows in reverse order (order effects)")
    ap.add_argument("--interleave", action="store_true", help="only the checkpointed rows, step by step in turn")
    args = ap.parse_args()
    config = llama32_1b_shape()
    rows = interleaved(config, args.steps) if args.interleave else sequential(config, args.steps, args.reverse)
    for r in rows:
        print(f"{r['model']:8s} ckpt={r['checkpointing']!s:5s} reuse={r['reuse']!s:5s} {r['tokens_per_s']:8.0f} tok/s "
              f"{r['vs_loram']:.2f}x LoRAM" + (f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, steps=args.steps, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
