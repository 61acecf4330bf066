"""rl stage: post-training with verifiable rewards — GRPO / DAPO / Dr. GRPO, AReaL's asynchronous
rollouts with a staleness bound and the decoupled PPO loss, LATR lookahead tree rollouts.

    python -m stages.rl --params params/rl.yaml --base data/base --lora data/lora --data data/tasks \
        --out data/rl --metrics metrics/rl.json --plots plots/rl

1. The policy: the base with the lora stage's recovered adapter merged in (start: lora) or the base
   alone, frozen, plus a fresh LoRA that this stage trains. The reference model of the KL term is
   the policy as RL found it (the adapter's weights at RL step 0).
2. Warm-up: supervised training of the adapter on the first `warmup.rows` rl_train rows (the start
   model has never seen `a+b-c`), mixed with replay rows of the base families and add3 (equal
   shares) so they are not forgotten, so RL starts from a pass@1 well above zero and far from one.
   RL then trains on the remaining rl_train rows only, with a PPO-ptx replay term (`ptx`).
3. RL (slimforge/rl/): per step P prompts x G samples on the KV cache (plain sampling, or LATR for
   a scheduled share of the prompts), rewards from the verifier named in params (`module:function`,
   checked before any work; samples on which it fails are skipped and counted), group-normalised
   advantages, groups with equal rewards dropped (dynamic sampling), the clipped loss with
   separate low/high clip aggregated as loss_type says. max_staleness > 0 moves rollouts to a
   second process that may run that many policy versions ahead (AReaL), with the decoupled loss.
4. Metrics: accuracy on rl_test (chain; the target), on the base families (test.jsonl) and add3
   (lora_test.jsonl) before the warm-up (`start`), after it (`warmup`: RL's starting point) and
   after RL (`rl`), each with n and a 95% interval; rl_val accuracy for choosing between rows;
   samples trained per second, rollout and trainer tokens/s, staleness histogram, failed rewards,
   LATR branch statistics; reward and completion-length curves; per-step MLflow metrics.
   Output: data/rl/adapter (PEFT folder for the base with the lora adapter merged first).
"""
