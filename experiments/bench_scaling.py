"""Training on 1 vs N GPUs of one host, and FSDP2 under a memory budget, through the loop every
training stage uses (slimforge.training.train_causal_lm), in one run.

    python -m experiments.bench_scaling [--nproc 2] [--workloads allreduce,base_fp32,base,base_weak,lora,rl,fsdp]
                                        [--json F]

Each workload runs under `torchrun --nproc-per-node W` for W = 1 and N, at the same global batch and
the same micro-batch per GPU, so tokens/s compare directly (steady rate: the second half of the steps):
- allreduce: one fp32 all-reduce of the base gpu preset's 76M gradients (N only): the interconnect;
- base: the base stage's `gpu` preset (76M Llama, bf16 autocast, torch.compile) pretraining on the
  embedded suite of params/data.yaml, as `SLIMFORGE_NPROC=N dvc repro base` runs it; base_eager
  without compilation; base_fp32 without bf16 either, 20 steps, whose loss curves at W = 1 and N
  must agree to float tolerance (bf16 runs drift apart: reductions cut differently round differently);
- lora: PEFT LoRA (rank 16, all seven projections) on a Llama-3.2-1B-shaped model with random bf16
  weights, 512-token sequences;
- base_weak: the base `gpu` preset with the per-GPU batch fixed instead (global batch 2048 x W):
  how much of the strong-scaling gap is one GPU's lower efficiency at half the batch;
- rl: the rl stage's loop (slimforge.rl.trainer.train_rl: rollouts on the KV cache, then the DAPO
  update) with a LoRA on a Llama-3.2-1B-shaped model with random bf16 weights, `--rl-prompts` x 8
  samples x 64 new tokens a step; W processes each take 1 / W of the prompts; generated tokens per
  second over the steps after the first;
- fsdp: full-parameter training of a Llama-3.2-3B-shaped model in bf16 under `--budget-gib` per GPU
  (enforced), which its weights + gradients + AdamW state exceed: on one GPU it runs out of memory;
  on N, `shard: auto` picks FSDP2. Peak memory per rank is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stages.lora.bench_memory import build, llama32_1b_shape

REPO = Path(__file__).resolve().parents[1]


def synthetic(n: int, length: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Random token rows of one length (the speed of a dense model does not depend on the values)."""
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(length)], length // 8) for _ in range(n)]


def llama_3b_shape():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                       num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=4096,
                       rope_theta=500000.0, tie_word_embeddings=True)


def run_workload(name: str, args) -> dict:
    """One workload in this process (one rank of torchrun's)."""
    from slimforge.config import Schedule, load_params
    from slimforge.training import train_causal_lm

    tmp = tempfile.mkdtemp(prefix="bench-ckpt-")
    if name == "allreduce":
        return _allreduce_bandwidth()
    if name.startswith("base"):
        from slimforge.pretrain import pretrain
        from stages.base.params import BaseParams

        preset = load_params(REPO / "params" / "base.yaml", BaseParams).presets["gpu"]
        fp32 = name == "base_fp32"  # the equivalence check: no bf16, no compilation, fewer steps
        from slimforge import distributed
        weak = distributed.world_size() if name == "base_weak" else 1
        preset = preset.model_copy(update={"steps": 20 if fp32 else args.steps, "checkpoint_every": 0,
                                           "log_every": args.steps, "compile": name in ("base", "base_weak"),
                                           "amp": "none" if fp32 else preset.amp,
                                           "batch_size": preset.batch_size * weak})
        _, _, metrics, losses = pretrain(preset, 0, Path(args.data), Path(tmp), "bench")
        return {"tokens_per_s": metrics["steady_tokens_per_s"], "final_loss": losses[-1], "losses": losses,
                "global_batch": preset.batch_size, "steps": preset.steps, "compile": preset.compile,
                "amp": preset.amp}
    if name == "rl":
        return _rl(args)
    if name == "lora":
        from slimforge.adapters import add_lora
        from slimforge.config import PROJECTIONS
        config = llama32_1b_shape()
        model = build(config, "full", 0.0)  # random bf16 weights on the GPU, frozen
        model = add_lora(model, rank=16, alpha=32, targets=list(PROJECTIONS))
        schedule = Schedule(steps=args.steps, lr=1e-4, warmup_steps=2, batch_size=32, micro_batch_size=8,
                            checkpoint_every=0)
    else:
        model = build(llama_3b_shape(), "full", 0.0).requires_grad_(True)
        config = model.config
        schedule = Schedule(steps=6, lr=1e-5, warmup_steps=1, batch_size=8, micro_batch_size=2,
                            checkpoint_every=0, shard="auto", memory_budget_gb=args.budget_gib)
    from slimforge import distributed

    state_gib = distributed.training_state_bytes(model) / 2 ** 30
    rows = synthetic(256, 512, config.vocab_size)
    torch.cuda.reset_peak_memory_stats()
    try:
        result = train_causal_lm(model, rows, schedule, pad_id=0, seed=0, checkpoint_dir=tmp, fingerprint="bench",
                                 amp_dtype=torch.bfloat16 if name == "lora" else None, progress=False)
    except torch.OutOfMemoryError as err:
        return {"out_of_memory": str(err).splitlines()[0][:200], "training_state_gib": state_gib,
                "peak_gib_per_rank": _peaks()}
    return {"tokens_per_s": result["steady_tokens_per_s"], "final_loss": result["losses"][-1],
            "global_batch": schedule.batch_size, "micro_batch": schedule.micro_batch_size, "steps": schedule.steps,
            "training_state_gib": state_gib, "peak_gib_per_rank": _peaks(),
            "strategy": distributed.choose_strategy(model, schedule.shard, schedule.memory_budget_gb)
            if distributed.world_size() > 1 else "single"}


def odd_length(answer: str, completion: str) -> float:
    """The rl workload's reward: a random model earns it half the time, so groups vary and train."""
    return float(len(completion) % 2)


def _rl(args) -> dict:
    from slimforge.adapters import add_lora
    from slimforge.config import PROJECTIONS, Schedule
    from slimforge.rl.batch import RolloutSpec
    from slimforge.rl.trainer import train_rl
    from slimforge.tasks.records import load_records
    from slimforge.tokenizer import build_tokenizer

    rows = load_records(Path(args.data) / "rl_train.jsonl", need_answer=True)
    tokenizer = build_tokenizer([r["prompt"] + r["response"] for r in rows], 512)
    config = llama32_1b_shape()
    config.vocab_size = len(tokenizer)
    model = add_lora(build(config, "full", 0.0), rank=16, alpha=32, targets=list(PROJECTIONS))
    spec = RolloutSpec(prompts=tuple((r["prompt"], r["answer"]) for r in rows), prompts_per_step=args.rl_prompts,
                       num_generations=8, max_new_tokens=64, temperature=1.0, seed=0,
                       reward="experiments.bench_scaling:odd_length", total_steps=args.rl_steps)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = train_rl(model, tokenizer, spec, Schedule(steps=args.rl_steps, lr=1e-5, warmup_steps=1,
                                                           batch_size=args.rl_prompts, checkpoint_every=0),
                          checkpoint_dir=tempfile.mkdtemp(prefix="bench-rl-"), fingerprint="bench")
    steady = result["history"][1:]  # the first step warms up kernels and caches
    rollout_s, update_s = (sum(h[k] for h in steady) for k in ("rollout_seconds", "update_seconds"))
    generated = sum(h["completion_length"] * args.rl_prompts * spec.num_generations for h in steady)
    return {"tokens_per_s": generated / (rollout_s + update_s), "rollout_seconds_per_step": rollout_s / len(steady),
            "update_seconds_per_step": update_s / len(steady), "prompts_per_step": args.rl_prompts,
            "steps": args.rl_steps, "mean_kept": sum(h["kept"] for h in steady) / len(steady),
            "peak_gib_per_rank": _peaks()}


def _allreduce_bandwidth(numel: int = 76_000_000) -> dict:
    """Seconds and bus bandwidth of one fp32 all-reduce of `numel` elements (the base gpu preset's
    gradients), median of 10: what DDP pays per step, unless it hides behind the backward pass."""
    from slimforge import distributed

    if distributed.world_size() == 1:
        return {"skipped": "one process"}
    t = torch.ones(numel, device="cuda")
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.distributed.all_reduce(t)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[3:])[5]
    world = distributed.world_size()
    return {"bytes": numel * 4, "seconds": seconds, "bus_gb_per_s": numel * 4 * 2 * (world - 1) / world / seconds / 1e9}


def _peaks() -> list[float]:
    """Every rank's peak allocated GPU memory (GiB), in rank order."""
    from slimforge import distributed

    mine = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device="cuda")
    if distributed.world_size() == 1:
        return mine.tolist()
    every = [torch.zeros_like(mine) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(every, mine)
    return [float(t) for t in every]


def worker(args) -> None:
    from slimforge import distributed

    distributed.init()
    row = run_workload(args.worker, args)
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(row))


def launch(workload: str, world: int, args, data: Path) -> dict:
    out = Path(tempfile.mkdtemp()) / "row.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "experiments.bench_scaling", "--worker", workload, "--out", str(out), "--data", str(data),
               "--steps", str(args.steps), "--rl-steps", str(args.rl_steps),
               "--rl-prompts", str(args.rl_prompts), "--budget-gib", str(args.budget_gib)]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # less fragmentation under a cap
    try:  # a rank that dies alone leaves the other waiting in a collective: bound the wait
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as err:
        return {"failed": f"timed out after {args.timeout} s: {str(err.stderr)[-1500:]}"}
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workloads", default="allreduce,base_fp32,base,base_weak,lora,rl,fsdp")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rl-steps", type=int, default=6)
    ap.add_argument("--rl-prompts", type=int, default=64)
    ap.add_argument("--budget-gib", type=float, default=23.0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--timeout", type=float, default=400, help="seconds per torchrun launch")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from slimforge.config import load_params
    from slimforge.io import write_jsonl
    from stages.data.params import DataParams
    from stages.data.stage import suite

    data = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    files, _ = suite(load_params(REPO / "params" / "data.yaml", DataParams))
    for name in ("train.jsonl", "judge_train.jsonl", "rl_train.jsonl"):
        write_jsonl(data / name, files[name])
    results = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "nproc": args.nproc,
               "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                            **{m: __import__(m).__version__ for m in ("transformers", "peft")}},
               "commit": os.environ.get("SLIMFORGE_COMMIT"), "budget_gib": args.budget_gib,
               "command": " ".join(sys.argv), "workloads": {}}
    for workload in args.workloads.split(","):
        rows = {str(world): launch(workload, world, args, data) for world in (1, args.nproc)}
        one, many = rows["1"], rows[str(args.nproc)]
        if one.get("tokens_per_s") and many.get("tokens_per_s"):
            rows["speedup"] = many["tokens_per_s"] / one["tokens_per_s"]
        if one.get("losses") and many.get("losses"):  # same global batch: the curves should agree
            rows["max_loss_difference"] = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
        results["workloads"][workload] = rows
        print(workload, json.dumps(rows)[:1500], flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
