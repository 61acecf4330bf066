"""One tiny training run of slimforge.training, for tests/test_distributed.py: in-process, or under

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_train.py CONFIG_JSON OUT_JSON

CONFIG_JSON: {"schedule": Schedule fields, "crash_at": optional micro-step count after which every
rank raises, "lora": whether only LoRA adapters train, "checkpoint_dir": resume folder}. Rank 0
writes {"losses", "weights": {name: list}, "world_size", "resumed_from"} to OUT_JSON.
"""

from __future__ import annotations

import json
import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimforge import distributed
from slimforge.config import Schedule
from slimforge.losses import causal_lm_loss
from slimforge.training import train_causal_lm


def tiny_model(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights="gaussian"))
    return model


def examples(n: int = 48, seed: int = 0) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) pairs of varied length: padding differs between one batch and its shares."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randrange(2, 8))]
        response = [rng.randrange(1, 64) for _ in range(rng.randrange(1, 10))]
        out.append((prompt + response, len(prompt)))
    return out


def train(config: dict) -> dict:
    model = tiny_model(config.get("lora", False))
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if config.get("crash_at") and calls["n"] > config["crash_at"]:
            raise RuntimeError("crash requested by the test")
        return causal_lm_loss(m, batch)

    result = train_causal_lm(model, examples(), Schedule(**config["schedule"]), pad_id=0, seed=0,
                             checkpoint_dir=config["checkpoint_dir"], fingerprint="test", loss_fn=loss_fn,
                             progress=False)
    weights = {n: p.detach().float().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": result["losses"], "weights": weights, "world_size": result["world_size"],
            "resumed_from": result["resumed_from"]}


if __name__ == "__main__":
    distributed.init()
    out = train(json.loads(sys.argv[1]))
    if distributed.is_main():
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)
