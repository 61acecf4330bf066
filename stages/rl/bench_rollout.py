"""Speed of the rl stage's two halves on one GPU: rollouts (`slimforge.rl.rollout.sample`) against
Hugging Face `generate`, the trainer's LoRA policy-gradient step, and where rollout time goes.

    python -m stages.rl.bench_rollout [--shape 0.5b|1b|all|tiny] [--batch 64] [--group 8] \
        [--prompt-len 64] [--new-tokens 128] [--repeats 3] [--json out.json]

Random bf16 weights (speed does not depend on them), Llama shapes close to Qwen2.5-0.5B and
Llama-3.2-1B (`SHAPES`; `tiny` with `--device cpu` is the smoke test). A batch: batch/group random
prompts of prompt-len tokens, each sampled `group` times (GRPO's layout), temperature 1, full
vocabulary. Times: median of `--repeats` runs after a warm-up, between synchronisations; peak GiB
(weights included) of each phase on CUDA.

1. rollout: `sample(..., eos_id=-1)`: a row stops when its drawn token equals eos_id, and drawn
   tokens lie in [0, vocab): every row makes exactly new-tokens tokens (asserted), sampled as usual.
2. generate: `model.generate(do_sample=True, temperature=1, top_k=0, min_new_tokens=max_new_tokens)`
   on the same rows (min_new_tokens: how generate users force the length; top_k=0: generate's
   default is 50, `sample` draws from the whole vocabulary). rollout_vs_generate = tok/s ratio.
3. rollout_lora: `sample` on the policy the stage samples from: the frozen model with an unmerged
   rank-16 adapter on all seven projections.
4. train: one update on those rollouts as `slimforge.rl.trainer` makes it (`sequence_logprobs` +
   `policy_loss(loss_type="dapo")`, backward, clip, AdamW on the adapter); tokens = completion tokens.
5. breakdown: prefill, a decode step (forward on the KV cache + sampling) at the full batch and at
   batch 1, sampling alone. A batch-1 step is nearly all fixed cost (Python, kernel launches,
   one read of the weights), so fixed_cost_share = step_b1 / step is the part of a full-batch step
   that batching does not amortise (near 1: launch-bound). CUDA: also the CUDA-graph decode rate
   (greedy, static cache, slimforge.evaluate.speed), the ceiling without Python overhead.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kernels.dispatch import triton
from slimforge import SlimforgeError
from slimforge.adapters import add_lora
from slimforge.cli_util import exit_on_error
from slimforge.config import PROJECTIONS
from slimforge.evaluate.speed import decode_tokens_per_s
from slimforge.modeling import cache_kwarg
from slimforge.rl.losses import policy_loss
from slimforge.rl.rollout import pick, positions, sample, sequence_logprobs
from slimforge.training import make_optimizer

SHAPES = {  # name: (hidden, layers, heads, kv heads, MLP, vocabulary, tied embeddings)
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),    # Qwen2.5-0.5B
    "1b": (2048, 16, 32, 8, 8192, 128256, True),     # Llama-3.2-1B
    "tiny": (64, 2, 4, 2, 128, 512, True),           # CPU smoke test
}


def llama_shape(name: str) -> LlamaConfig:
    hidden, layers, heads, kv, mlp, vocab, tied = SHAPES[name]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=mlp, vocab_size=vocab,
                       max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=tied)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float | None, object]:
    """(median seconds over `repeats` calls after `warmup` untimed ones, peak GiB during the timed
    calls or None off CUDA, the last result)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):  # each call ends synchronised, so the next one starts from an idle device
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, out


@torch.no_grad()
def breakdown(model, rows: torch.Tensor, steps: int, repeats: int) -> dict:
    """Prefill (seconds, peak GiB) and the median decode step (forward on the cache + `pick`), run
    the way `sample` runs them, at the batch of `rows`."""
    device, kw, ones = rows.device, cache_kwarg(model), torch.ones_like(rows)

    def prefill(cache: DynamicCache) -> torch.Tensor:
        return model(input_ids=rows, attention_mask=ones, position_ids=positions(ones), use_cache=True,
                     logits_to_keep=1, **{kw: cache}).logits[:, -1]

    prefill_s, prefill_peak, _ = timed(lambda: prefill(DynamicCache()), device, repeats)
    cache = DynamicCache()
    logits, mask, pos = prefill(cache), ones, positions(ones)[:, -1:]

    def step() -> None:
        nonlocal logits, mask, pos
        token, _ = pick(logits, 1.0, 0, None)
        mask, pos = torch.cat([mask, ones[:, :1]], 1), pos + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **{kw: cache}).logits[:, -1]

    return {"prefill_s": prefill_s, "prefill_peak_gib": prefill_peak, "decode_step_s": timed(step, device, steps)[0]}


def bench_shape(shape: str, device: torch.device, batch: int, group: int, prompt_len: int, new_tokens: int,
                repeats: int) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls crawl on CPUs
    with torch.device(device):
        model = LlamaForCausalLM(config := llama_shape(shape)).to(dtype).eval().requires_grad_(False)
    prompts = torch.randint(0, config.vocab_size, (batch // group, prompt_len)).tolist()
    rows = torch.tensor([p for p in prompts for _ in range(group)], device=device)
    completion_tokens = batch * new_tokens
    res = {"shape": shape, "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "dtype": str(dtype),
           "batch": batch, "group": group, "prompts": batch // group, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "weights_gib": torch.cuda.memory_allocated(device) / 2**30 if cuda else None}

    def rollout(m):
        r = sample(m, prompts, num_generations=group, max_new_tokens=new_tokens, temperature=1.0, top_k=0,
                   eos_id=-1, pad_id=0, batch_size=batch)
        assert int(r.completion_mask.sum()) == completion_tokens, "a row stopped early: EOS was not disabled"
        return r

    def generate():
        out = model.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape == (batch, prompt_len + new_tokens), f"generate returned {tuple(out.shape)}"
        return out

    for name, fn in (("rollout", lambda: rollout(model)), ("generate", generate)):
        s, peak, _ = timed(fn, device, repeats)
        res.update({f"{name}_s": s, f"{name}_tokens_per_s": completion_tokens / s, f"{name}_peak_gib": peak})
    res["rollout_vs_generate"] = res["rollout_tokens_per_s"] / res["generate_tokens_per_s"]

    steps = min(8, new_tokens)
    res.update(breakdown(model, rows, steps, repeats))
    res["decode_step_b1_s"] = breakdown(model, rows[:1], steps, repeats)["decode_step_s"]
    logits = torch.randn(batch, config.vocab_size, device=device, dtype=dtype)
    sampling_s = timed(lambda: pick(logits, 1.0, 0, None), device, max(repeats, 5))[0]
    res.update({"decode_s": res["rollout_s"] - res["prefill_s"], "sampling_s": sampling_s,
                "fixed_cost_share": min(1.0, res["decode_step_b1_s"] / res["decode_step_s"]),
                "graph_decode_tokens_per_s": None})
    if cuda:  # greedy, static cache, one CUDA graph per step
        res["graph_decode_tokens_per_s"] = decode_tokens_per_s(model, batch_size=batch, prompt_len=prompt_len,
                                                                new_tokens=new_tokens)[0]

    policy = add_lora(model, rank=16, alpha=32, targets=list(PROJECTIONS))
    s, peak, r = timed(lambda: rollout(policy), device, repeats)
    res.update({"rollout_lora_s": s, "rollout_lora_tokens_per_s": completion_tokens / s, "rollout_lora_peak_gib": peak})

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(policy, lr=1e-6, weight_decay=0.0)
    advantages = torch.randn(batch, device=device)

    def train_step():
        policy.train()
        logp = sequence_logprobs(policy, r, 1.0)
        loss, _ = policy_loss(logp, r.logprobs, advantages, r.completion_mask, loss_type="dapo", epsilon=0.2,
                              epsilon_high=0.28)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    s, peak, _ = timed(train_step, device, repeats, warmup=2)  # step 1 also allocates AdamW's moments
    res.update({"train_s": s, "train_tokens_per_s": completion_tokens / s, "train_peak_gib": peak,
                "train_all_tokens_per_s": r.attention_mask.sum().item() / s,
                "trainable_params_m": sum(p.numel() for p in trainable) / 1e6})
    return res


def record(device: torch.device, argv: list[str]) -> dict:
    """What a committed benchmark JSON carries: command, commit, device, versions, date."""
    def git(*a: str) -> str:  # "" where there is no git or no repository (a bare copy of the tree)
        try:
            return subprocess.run(["git", *a], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                                  text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"command": " ".join(["python -m stages.rl.bench_rollout", *argv]), "commit": commit or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__ if triton else None, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat()}


def show(r: dict) -> None:
    print(f"\n{r['shape']}: {r['params_b']:.2f}B params {r['dtype']}, batch {r['batch']} = {r['prompts']} prompts x "
          f"{r['group']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens")
    print(f"{'phase':14s} {'tok/s':>10s} {'seconds':>9s} {'peak GiB':>8s}")
    for key in ("rollout", "generate", "rollout_lora", "train"):  # rollout = sample; the last two with LoRA
        peak = r[f"{key}_peak_gib"]
        print(f"{key:14s} {r[f'{key}_tokens_per_s']:10.0f} {r[f'{key}_s']:9.3f} " + (f"{peak:8.2f}" if peak else "       -"))
    print(f"rollout / generate: {r['rollout_vs_generate']:.2f}x")
    print(f"rollout = prefill {r['prefill_s'] * 1e3:.1f} ms + decode {r['decode_s'] * 1e3:.1f} ms "
          f"({r['new_tokens'] - 1} steps); decode step {r['decode_step_s'] * 1e3:.2f} ms at batch {r['batch']}, "
          f"{r['decode_step_b1_s'] * 1e3:.2f} ms at batch 1 (fixed-cost share {r['fixed_cost_share']:.2f}), "
          f"sampling alone {r['sampling_s'] * 1e3:.2f} ms")
    if r["graph_decode_tokens_per_s"]:
        print(f"CUDA-graph decode ceiling (greedy, static cache): {r['graph_decode_tokens_per_s']:.0f} tok/s vs "
              f"eager decode {r['batch'] / r['decode_step_s']:.0f} tok/s")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=(*SHAPES, "all"), default="0.5b", help="all = 0.5b then 1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64, help="rows per rollout batch = prompts x group")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's G)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (EOS disabled)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per number (median)")
    ap.add_argument("--json", help="also write the results here (after each shape)")
    args = ap.parse_args(argv)
    if min(args.batch, args.group, args.prompt_len, args.new_tokens, args.repeats) < 1 or args.batch % args.group:
        raise SlimforgeError(f"--batch {args.batch} must be a multiple of --group {args.group}, and every size >= 1")
    device = torch.device(args.device)
    out = {**record(device, argv), "results": []}
    print(f"{out['gpu']}, torch {out['torch']}, transformers {out['transformers']}, commit {out['commit'][:10]}")
    for shape in ("0.5b", "1b") if args.shape == "all" else (args.shape,):
        out["results"].append(bench_shape(shape, device, args.batch, args.group, args.prompt_len, args.new_tokens,
                                          args.repeats))
        show(out["results"][-1])
        if args.json:  # after every shape: a later one that fails keeps the earlier
            Path(args.json).write_text(json.dumps(out, indent=2))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    exit_on_error(main)
