"""A pruning plan: which query heads, key/value heads and MLP channels every layer keeps.

Saved as plan.json beside a pruned model; LoRA recovery (LoRAM) expands adapters back to the
full model's shape with it. Indices are the original model's, ascending, query heads grouped by
their key/value head, so `q_heads[j] // group` is the key/value head query head j reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimforge import SlimforgeError

SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass
class LayerPlan:
    q_heads: list[int]
    kv_heads: list[int]
    channels: list[int]


@dataclass
class PrunePlan:
    arch: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    layers: list[LayerPlan]
    meta: dict = field(default_factory=dict)

    @property
    def group(self) -> int:
        """Query heads per key/value head in the original model."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def identity(cls, config) -> "PrunePlan":
        """Keep everything: the plan of a 0%-sparsity prune."""
        arch, dims = model_dims(config)
        n_layers = config.num_hidden_layers
        layers = [LayerPlan(list(range(dims["num_heads"])), list(range(dims["num_kv_heads"])),
                            list(range(dims["intermediate_size"]))) for _ in range(n_layers)]
        return cls(arch=arch, layers=layers, **dims)

    def validate(self) -> None:
        """Every layer keeps >= 1 key/value head and >= 1 channel, and each kept key/value head
        serves the same number of kept query heads, all of them its own."""
        for i, lp in enumerate(self.layers):
            where = f"plan layer {i}"
            if not lp.kv_heads or not lp.q_heads or not lp.channels:
                raise SlimforgeError(f"{where} removes every head or every MLP channel; keep at least one")
            for name, idx, limit in (("q_heads", lp.q_heads, self.num_heads),
                                     ("kv_heads", lp.kv_heads, self.num_kv_heads),
                                     ("channels", lp.channels, self.intermediate_size)):
                if sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= limit:
                    raise SlimforgeError(f"{where}: {name} must be ascending unique indices in [0, {limit})")
            per_kv = {kv: [q for q in lp.q_heads if q // self.group == kv] for kv in lp.kv_heads}
            if sum(len(v) for v in per_kv.values()) != len(lp.q_heads) or len({len(v) for v in per_kv.values()}) != 1:
                raise SlimforgeError(f"{where}: every kept key/value head must serve the same number of kept "
                                     f"query heads, and every kept query head its own key/value head")

    def check_matches(self, config) -> None:
        arch, dims = model_dims(config)
        mine = {k: getattr(self, k) for k in dims}
        if arch != self.arch or mine != dims or len(self.layers) != config.num_hidden_layers:
            raise SlimforgeError(f"plan (arch {self.arch}, {len(self.layers)} layers, {mine}) does not match "
                                 f"the model (arch {arch}, {config.num_hidden_layers} layers, {dims})")

    def widths(self) -> dict[str, list[int]]:
        return {"layer_num_heads": [len(lp.q_heads) for lp in self.layers],
                "layer_num_kv_heads": [len(lp.kv_heads) for lp in self.layers],
                "layer_intermediate_sizes": [len(lp.channels) for lp in self.layers]}

    def save(self, path: str | Path) -> None:
        from slimforge.io import write_json
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        from slimforge.io import read_json
        data = read_json(path)
        try:
            layers = [LayerPlan(**lp) for lp in data.pop("layers")]
            plan = cls(layers=layers, **data)
        except (TypeError, KeyError) as err:
            raise SlimforgeError(f"{path}: not a pruning plan ({err})") from None
        plan.validate()
        return plan


def model_dims(config) -> tuple[str, dict[str, int]]:
    """(architecture, the dimensions a plan is made against) of a model config."""
    arch = config.model_type
    if arch not in SUPPORTED:
        raise SlimforgeError(f"cannot prune architecture '{arch}' (supported: {', '.join(SUPPORTED)})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return arch, {"hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
                  "num_kv_heads": config.num_key_value_heads, "head_dim": head_dim,
                  "intermediate_size": config.intermediate_size}
