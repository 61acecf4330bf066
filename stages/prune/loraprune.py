"""LoRAPrune importance: which weights matter, estimated from LoRA gradients alone.

A short LoRA pass on calibration text (frozen weights get no gradients: only the adapters'
gradients exist, which is what makes this cheap on a large model). For every adapted linear
W (out x in) with adapter B A (scale s), the gradient of W is estimated from the adapter's as
G = dB A + B dA - dB dA, and a weight's importance is |G * (W + s B A)| (first-order Taylor of the
loss change on removing it). Importances are smoothed over steps with an exponential moving
average, then summed over each head's or channel's weights by the caller.
"""

from __future__ import annotations

import copy
import logging

import torch
from peft import LoraConfig, get_peft_model

from slimforge.adapters import quiet_peft
from slimforge.cli_util import progress

log = logging.getLogger(__name__)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def loraprune_importance(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], rank: int,
                         steps: int, lr: float, ema: float, seed: int) -> dict[str, torch.Tensor]:
    """{'model.layers.{i}.{self_attn|mlp}.{proj}': importance (out x in, fp32)} from `steps`
    LoRA updates over `batches` (cycled). `model` itself is left untouched."""
    torch.manual_seed(seed)
    with quiet_peft():
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                              target_modules=TARGETS))
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    modules = {name.split("base_model.model.", 1)[1]: m for name, m in peft.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    scores: dict[str, torch.Tensor] = {}
    for step in progress(range(steps), desc="loraprune importance", unit="step", log=log):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for name, m in modules.items():
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                ga, gb = a.grad, b.grad
                grad_w = gb @ a + b @ ga - gb @ ga
                imp = (grad_w * (m.base_layer.weight + m.scaling["default"] * (b @ a))).abs().float()
                scores[name] = imp if name not in scores else ema * scores[name] + (1 - ema) * imp
        opt.step()
    return scores
