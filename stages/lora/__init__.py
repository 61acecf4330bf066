"""lora stage: LoRAM ("Train Small, Infer Large") — train LoRA on the pruned (or quantized pruned)
model, recover the adapters to the full model's shape, infer with the full model.

    python -m stages.lora --params params/lora.yaml --base data/base --data data/tasks \
        --out data/lora --metrics metrics/lora.json --plots plots/lora

1. The small model, the folder params name in `model`: a pruned folder (the base cut to its
   plan.json with prune_weights: selection, or its refit weights), a quantized one (QLoRAM: the
   frozen weights stay packed and run on the low-bit kernels), or the base itself (plain LoRA).
2. Alignment: a short full-parameter training of the small model towards the full one (by
   default matching its residual stream after every layer), so the adapters learn on a model that
   computes like the one they will serve. A quantized model's packed weights stay frozen; its
   low-rank correction factors, norms and embeddings align.
3. PEFT LoRA on it (checkpointed, resumable).
4. Recovery (recover.py): every adapter matrix expanded along the pruned dimension with the plan,
   saved as a standard PEFT adapter of the base model (`data/lora/adapter`, the product) beside the
   pruned model's own adapter (`data/lora/pruned_adapter`) and that (aligned) pruned model
   (`data/lora/pruned_model`).
5. Metrics for (a) pruned model + its adapter, (b) base + recovered adapter, loaded back with
   PeftModel.from_pretrained, (c) the untouched base, (d) LoRA trained on the full base with the same
   data, steps and seed; training memory and tokens/s of both trainings (each peak its own: models
   not training are released first) and alignment's cost beside them; loss curves. The headline
   `accuracy_lora` is the macro accuracy over the training rows' own families (lora_test.jsonl);
   `accuracy_lora_val` the same on lora_val.jsonl, what ablations (experiments/lora_ablation.py)
   select on.
"""
