"""LoRA adapters through PEFT on any model slimforge loads (dense, pruned, or quantized), and the
one LoRA training recipe the stages share (`train_lora`).

On a quantized model the frozen weights stay packed: PEFT's LoRA layer wraps each QuantLinear and
calls it for the base output, so the forward and the input-gradient run on the low-bit kernels
and no dense copy of the frozen matrix is kept (QLoRA / QLoRAM). Such a layer cannot be merged
(there is no dense weight to merge into); the adapter is served beside the packed model instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError
from slimforge.config import Schedule
from slimforge.training import train_causal_lm


@contextlib.contextmanager
def quiet_peft():
    """Wrapping or loading adapters without PEFT's known, harmless warnings on our models:
    - "Unsupported layer type" on QuantLinear: the custom-module hook (_for_packed_layers) wraps it.
    - FutureWarning "`is_gradient_checkpointing` is deprecated" (transformers 5): PeftModel.__init__
      of peft 0.21 reads the old property name; it returns the same value, and we never call it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


class _DropPrunedConfigCheck(logging.Filter):
    """PEFT's save_pretrained checks whether the embeddings were resized by building the adapted
    model's config class from the base folder: PrunedLlamaConfig.from_pretrained(<llama folder>),
    and transformers warns "You are using a model of type `llama` to instantiate a model of type
    `slimforge_pruned_llama`" on every save of a pruned model's adapter. It only reads vocab_size,
    which pruning never changes, so that one message is dropped; other type mismatches still warn."""

    PATTERN = re.compile(r"to instantiate a model of type `slimforge_pruned_")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.PATTERN.search(record.getMessage())


logging.getLogger("transformers.configuration_utils").addFilter(_DropPrunedConfigCheck())


def linear_names(model: torch.nn.Module) -> set[str]:
    """Last names of the decoder's linear layers (dense or packed), e.g. {'q_proj', ...}."""
    return {n.split(".")[-1] for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, QuantLinear)) and ".layers." in f".{n}"}


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    have = linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing or not targets:
        raise SlimforgeError(f"adapter targets {missing or targets} are not linear layers of the model's decoder "
                             f"(it has: {', '.join(sorted(have))})")


def lora_config(model: torch.nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
                init: bool | str = True) -> LoraConfig:
    """A plain LoRA config (no bias, no modules_to_save: what vLLM's loader accepts). Packed
    QuantLinear layers get PEFT's LoRA layer through its custom-module hook."""
    if rank <= 0:
        raise SlimforgeError(f"LoRA rank must be >= 1, got {rank}")
    check_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM", init_lora_weights=init)
    return _for_packed_layers(config, model)


def _for_packed_layers(config: LoraConfig, model: torch.nn.Module) -> LoraConfig:
    """Let PEFT wrap QuantLinear with its plain LoRA layer, where the model has packed layers."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        config._register_custom_module({QuantLinear: LoraLinear})
    return config


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
             seed: int = 0, init: bool | str = True) -> PeftModel:
    """`model` wrapped with fresh LoRA adapters; only the adapters require grad."""
    config = lora_config(model, rank, alpha, targets, dropout, init)
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    with quiet_peft():
        return get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, folder: str | Path) -> PeftModel:
    """`model` with the PEFT adapter saved in `folder` (inference mode)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise SlimforgeError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    config = _for_packed_layers(LoraConfig.from_pretrained(folder), model)
    with quiet_peft():
        return PeftModel.from_pretrained(model, folder, config=config, is_trainable=False)


def state_bytes(model: torch.nn.Module) -> int:
    """Weights and buffers held during training plus AdamW's two moments of the trainable ones."""
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return held + 2 * trainable


def train_lora(model: torch.nn.Module, examples: list, schedule: Schedule, *, rank: int, alpha: float,
               targets: list[str], seed: int, pad_id: int, checkpoint_dir: str | Path, fingerprint: str,
               dropout: float = 0.0, on_log=None, progress: bool = True, desc: str = "lora"
               ) -> tuple[PeftModel, dict]:
    """The LoRA recipe every stage uses: wrap `model` (frozen) with fresh adapters and train them on
    `examples` (response cross-entropy). Returns (peft model, report: seconds, steady tokens/s,
    training state bytes, trainable parameters, CUDA peak memory, per-step losses)."""
    peft_model = add_lora(model, rank, alpha, targets, dropout, seed=seed)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    history = train_causal_lm(peft_model, examples, schedule, pad_id=pad_id, seed=seed, checkpoint_dir=checkpoint_dir,
                              fingerprint=fingerprint, on_log=on_log, progress=progress,
                              desc=desc)
    return peft_model, {
        "seconds": history["seconds"], "tokens_per_s": history["steady_tokens_per_s"],
        "state_bytes": state_bytes(peft_model), "resumed_from": history["resumed_from"],
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "losses": history["losses"]}
