"""The base stage's run(): the method is described in stages/base/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

from pathlib import Path

from slimforge.evaluate import evaluate_suite
from slimforge.evaluate.harness import eval_files
from slimforge.io import write_provenance
from slimforge.modeling import load_model, save_model
from slimforge.plots import write_curve
from slimforge.pretrain import TRAIN_FILES, pretrain, train_files
from slimforge.stage import open_stage
from stages.base.params import BaseParams, ModelParams


# What `dvc metrics show` compares; timings, judge accuracy and bytes go to the report (--report).
HEADLINE = ["accuracy_base", "accuracy.*", "n.*", "ci95.*", "ppl", "params"]


def run(model_params: ModelParams, params: BaseParams, data: str | Path, out: str | Path, metrics: str | Path,
        plots: str | Path, report: str | Path | None = None) -> dict:
    data, plots = Path(data), Path(plots)
    preset = params.presets[params.preset]
    logged = {"model": model_params.model_dump(), "seed": params.seed, "preset": params.preset,
              **({} if model_params.source else {"arch": preset.model_dump()})}
    inputs = [] if model_params.source else train_files(data)  # what decides the trained weights
    with open_stage("base", logged, out=out, inputs=inputs, metrics=metrics, report=report,
                    device=preset.device) as stage:
        measured, losses = {}, []
        if model_params.source:
            model, tokenizer = load_model(model_params.source, model_params.dtype,
                                          model_params.trust_remote_code, stage.device)
        else:
            model, tokenizer, measured["train"], losses = pretrain(
                preset, params.seed, data, stage.checkpoints, stage.fingerprint, on_log=stage.logger())
        # dvc.yaml declares the loss plot either way: a loaded model's is empty and says why
        title = "base: training loss" if losses else f"base: {model_params.source} loaded, not trained here"
        curves = write_curve(plots / "loss", list(range(1, len(losses) + 1)), {"loss": losses}, "step", title,
                             smooth=25)
        with stage.output() as tmp:
            save_model(model, tokenizer, tmp)
            write_provenance(tmp, "base", logged, parent=data)
        result = evaluate_suite(model, tokenizer, data, model_dir=out, batch_size=params.eval_batch_size)
        return stage.finish({**result, **measured}, plots=curves, headline=HEADLINE)


def suite_files(params: BaseParams) -> list[str]:
    """The data stage's files this stage reads: pretraining text and evaluation."""
    return sorted({*TRAIN_FILES, *eval_files()})
