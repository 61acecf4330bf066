"""The rl stage's run(): the method is described in stages/rl/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from slimforge import SlimforgeError
from slimforge.adapters import add_lora, load_adapter
from slimforge.batching import encode_records
from slimforge.evaluate import evaluate, evaluate_suite
from slimforge.evaluate.harness import eval_files
from slimforge.io import write_json, write_provenance
from slimforge.modeling import load_model, load_tokenizer
from slimforge.plots import write_curve
from slimforge.rl.batch import RolloutSpec
from slimforge.rl.rewards import load_reward
from slimforge.rl.trainer import train_rl
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from slimforge.training import train_causal_lm
from stages.rl.params import RlParams

TEST_FILES = ("test.jsonl", "lora_test.jsonl", "rl_test.jsonl")  # kept?, kept?, learned?
MACRO = {"accuracy_lora": ["add3"], "accuracy_rl": ["chain"]}
RL_TRAIN, RL_VAL, REPLAY = "rl_train.jsonl", "rl_val.jsonl", ("train.jsonl", "lora_train.jsonl")

# What `dvc metrics show` compares; curves, timings and LATR statistics go to the report.
HEADLINE = ["results.*.accuracy_rl", "results.*.ci95.accuracy_rl.*", "results.*.accuracy_rl_val",
            "results.*.accuracy_base", "results.*.ci95.accuracy_base.*", "results.*.accuracy_lora",
            "results.*.ci95.accuracy_lora.*", "rl.samples_per_s", "rl.failed_rewards"]


def build_policy(base_dir: str, lora_adapter: str | None, rank: int, alpha: float, targets: tuple[str, ...],
                 seed: int, device: str = "cpu") -> torch.nn.Module:
    """The policy: the base (with the lora stage's adapter merged in when given) plus a fresh RL
    adapter. Top-level so that the rollout process can build the same model (asynchronous mode)."""
    model, _ = load_model(base_dir, device=device)
    if lora_adapter is not None:
        model = load_adapter(model, lora_adapter).merge_and_unload()
    model.requires_grad_(False)
    return add_lora(model, rank, alpha, list(targets), seed=seed)


def warmup_examples(params: RlParams, data: Path, tokenizer) -> list:
    """The first `warmup.rows` rl_train rows with responses, plus `replay` times as many rows drawn
    (seeded) from the base families' and the LoRA family's training files, an equal share from each
    file: pooled, the LoRA family's 4k rows drowned in the base's 80k and add3 was forgotten."""
    rows = load_records(data / RL_TRAIN)[:params.warmup.rows]
    replay = replay_rows(data, round(params.warmup.replay * len(rows)), f"{params.seed}:replay")
    return encode_records(rows + replay, tokenizer, max_len=params.warmup.max_len)


def replay_rows(data: Path, n: int, seed: str) -> list[dict]:
    """`n` rows drawn (seeded) from the replay files, an equal share from each."""
    rng, out = random.Random(seed), []
    for f in REPLAY:
        pool = load_records(data / f)
        out += rng.sample(pool, min(len(pool), n // len(REPLAY)))
    return out


def rl_prompts(params: RlParams, data: Path) -> tuple[tuple[str, str], ...]:
    """The rl_train rows after the warm-up's: RL on prompts the warm-up memorised rewards recall,
    not reasoning (their sampled accuracy ran 15 points above rl_val's, and RL gained nothing)."""
    rows = load_records(data / RL_TRAIN, need_answer=True)
    skip = params.warmup.rows if params.warmup.steps else 0
    if len(rows) - skip < params.train.batch_size:
        raise SlimforgeError(f"{RL_TRAIN} has {len(rows)} rows; the warm-up takes the first {skip}, which leaves "
                             f"fewer than train.batch_size={params.train.batch_size} prompts for RL (lower "
                             "warmup.rows or raise the data stage's rl.train)")
    return tuple((r["prompt"], r["answer"]) for r in rows[skip:])


def rollout_spec(params: RlParams, data: Path) -> RolloutSpec:
    """What decides each step's rollouts: the RL prompts and the sampling params."""
    return RolloutSpec(prompts=rl_prompts(params, data), prompts_per_step=params.train.batch_size,
                       num_generations=params.num_generations, max_new_tokens=params.max_completion_length,
                       temperature=params.temperature, seed=params.seed, reward=params.reward,
                       format_reward=params.format_reward, total_steps=params.train.steps,
                       latr_share=(params.latr.share_start, params.latr.share_end),
                       latr={k: v for k, v in params.latr.model_dump().items() if not k.startswith("share")})


def ptx_args(params: RlParams, data: Path, tokenizer) -> dict:
    """train_rl's PPO-ptx arguments: `ptx.rows` replay rows (fresh draws, not the warm-up's)."""
    if params.ptx.coef <= 0:
        return {}
    rows = replay_rows(data, params.ptx.rows, f"{params.seed}:ptx")
    return {"replay": encode_records(rows, tokenizer, max_len=params.warmup.max_len),
            "replay_coef": params.ptx.coef, "replay_batch_size": params.ptx.batch_size}


def check_context(spec: RolloutSpec, tokenizer, context: int) -> None:
    """Refuse (before any training) a prompt that leaves no room for max_completion_length new
    tokens: truncating a prompt would change the question the verifier checks the answer of."""
    longest = max(len(tokenizer(p)["input_ids"]) for p, _ in spec.prompts)
    if longest + spec.max_new_tokens > context:
        raise SlimforgeError(f"{RL_TRAIN}: the longest prompt has {longest} tokens; with max_completion_length "
                             f"{spec.max_new_tokens} that exceeds the model's context of {context} tokens "
                             "(shorten the prompts or lower max_completion_length)")


def run(params: RlParams, base: str | Path, lora: str | Path, data: str | Path, out: str | Path,
        metrics: str | Path, plots: str | Path, report: str | Path | None = None) -> dict:
    load_reward(params.reward)  # a wrong module:function fails before any work
    base_dir, data = Path(base), Path(data)
    adapter = str(Path(lora) / "adapter") if params.start == "lora" else None
    inputs = [base_dir, data] + ([Path(adapter)] if adapter else [])
    with open_stage("rl", params.model_dump(), out=out, inputs=inputs, metrics=metrics, report=report) as stage:
        policy = build_policy(str(base_dir), adapter, params.rank, params.alpha, tuple(params.targets), params.seed,
                              stage.device)
        tokenizer = load_tokenizer(base_dir)  # the policy's own: its weights are loaded once, above
        spec = rollout_spec(params, data)
        check_context(spec, tokenizer, policy.config.max_position_embeddings)
        val = load_records(data / RL_VAL, need_answer=True)

        def score(model) -> dict:  # test files (reported) and rl_val (what a choice between rows reads)
            with torch.no_grad():
                on_val = evaluate(model, tokenizer, val, batch_size=params.eval_batch_size)
                result = evaluate_suite(model, tokenizer, data, batch_size=params.eval_batch_size,
                                        test_files=TEST_FILES, macro=MACRO)
            return {**result, "accuracy_rl_val": on_val["accuracy"]["chain"], "ci95_rl_val": on_val["ci95"]["accuracy"]["chain"]}

        results = {}
        with policy.disable_adapter():
            results["start"] = score(policy)
        training = {}
        if params.warmup.rows and params.warmup.steps:
            history = train_causal_lm(policy, warmup_examples(params, data, tokenizer), params.warmup,
                                      pad_id=tokenizer.pad_token_id, seed=params.seed,
                                      checkpoint_dir=stage.checkpoints / "warmup", fingerprint=stage.fingerprint,
                                      on_log=stage.logger("warmup_"), desc="warmup")
            training["warmup"] = {"seconds": history["seconds"], "final_loss": history["losses"][-1]}
            results["warmup"] = score(policy)
        rl = train_rl(policy, tokenizer, spec, params.train, checkpoint_dir=stage.checkpoints / "rl",
                      fingerprint=stage.fingerprint, loss_type=params.loss_type, epsilon=params.epsilon,
                      epsilon_high=params.epsilon_high, beta=params.beta, num_iterations=params.num_iterations,
                      scale_rewards=params.scale_rewards, dynamic_sampling=params.dynamic_sampling,
                      max_staleness=params.max_staleness, behaviour_cap=params.behaviour_cap,
                      build_policy=functools.partial(build_policy, str(base_dir), adapter, params.rank, params.alpha,
                                                     tuple(params.targets), params.seed),
                      tokenizer_dir=str(base_dir), on_log=stage.logger("rl_"), **ptx_args(params, data, tokenizer))
        results["rl"] = score(policy)
        with stage.output() as tmp:
            policy.save_pretrained(tmp / "adapter")
            write_json(tmp / "adapter" / "merge_first.json", {
                "base": str(base_dir), "merge_first": adapter,
                "note": "apply this adapter to the base with merge_first (the lora stage's adapter) merged in"})
            write_provenance(tmp, "rl", params.model_dump(), parent=base_dir)
        history = rl["history"]
        steps = [h["step"] for h in history]
        files = write_curve(Path(plots) / "reward", steps,
                            {"reward": [h["reward"] for h in history], "correct": [h["correct"] for h in history],
                             "kept groups": [h["kept"] for h in history]},
                            "step", "rl: reward, share correct, share of groups kept per step", smooth=5)
        files += write_curve(Path(plots) / "length", steps, {"completion": [h["completion_length"] for h in history]},
                             "step", "rl: mean completion length (tokens)", smooth=5)
        measured = {"start": params.start, "results": results, "training": training,
                    "rl": {**rl, "steps": params.train.steps, "final": history[-1] if history else {}},
                    "gain_rl_test": results["rl"]["accuracy_rl"] - results[list(results)[-2]]["accuracy_rl"]}
        return stage.finish(measured, plots=files, headline=HEADLINE + ["gain_rl_test"])


def suite_files(params: RlParams) -> list[str]:
    """The data stage's files this stage reads."""
    return sorted({RL_TRAIN, RL_VAL, *REPLAY, *eval_files(TEST_FILES)})
