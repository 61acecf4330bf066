"""base stage: load the model named in params/model.yaml, or train the embedded tiny Llama.

    python -m stages.base --model-params params/model.yaml --params params/base.yaml \
        --data data/tasks --out data/base --metrics metrics/base.json --plots plots/base

A killed run resumes from its last checkpoint (data/.checkpoints/base) on the next call.
"""

from __future__ import annotations

from pathlib import Path

from slimforge.evaluate import evaluate_suite
from slimforge.io import atomic_dir, folder_hash, write_json, write_provenance
from slimforge.modeling import load_model, save_model
from slimforge.plots import write_curve
from slimforge.tracking import stage_run
from slimforge.training import finish_training
from stages.base.params import BaseParams, ModelParams
from stages.base.pretrain import pretrain, resolve_device


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Checkpoints live beside the output, not in it: DVC deletes declared outputs before a stage
    runs, and the checkpoint must survive that to be resumed."""
    return out_dir.parent / ".checkpoints" / out_dir.name


def run(model_params: ModelParams, params: BaseParams, data_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path) -> dict:
    data_dir, out_dir, plots_dir = Path(data_dir), Path(out_dir), Path(plots_dir)
    preset = params.presets[params.preset]
    logged = {"model": model_params.model_dump(), "seed": params.seed, "preset": params.preset,
              **({} if model_params.source else {"arch": preset.model_dump()})}
    checkpoints = checkpoint_dir_for(out_dir)
    with stage_run("base", logged) as tracker:
        train_metrics = None
        if model_params.source:
            model, tokenizer = load_model(model_params.source, model_params.dtype,
                                          model_params.trust_remote_code, resolve_device(preset.device))
        else:
            model, tokenizer, train_metrics, losses = pretrain(preset, params.seed, data_dir, checkpoints,
                                                               on_log=tracker.log_step)
            csv, png = write_curve(plots_dir / "loss", list(range(1, len(losses) + 1)),
                                   {"loss": losses}, "step", "base: training loss", smooth=25)
            tracker.log_artifact(csv, "plots")
            tracker.log_artifact(png, "plots")
        with atomic_dir(out_dir) as tmp:
            save_model(model, tokenizer, tmp)
            write_provenance(tmp, "base", logged, parent=folder_hash(data_dir))
        metrics = evaluate_suite(model, tokenizer, data_dir, model_dir=out_dir,
                                 batch_size=params.eval_batch_size)
        if train_metrics is not None:
            metrics["train"] = train_metrics
        write_json(metrics_path, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
        finish_training(checkpoints)
    return metrics
