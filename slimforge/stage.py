"""The stage skeleton: what every stage's run() stands on, as small pieces rather than a base class.

    with open_stage("prune", params.model_dump(), out=out, inputs=[Path(model), Path(data)],
                    metrics=metrics) as stage:
        model, tokenizer = load_model(model, device=stage.device)
        ...                                   # resumable state goes under stage.checkpoints
        with stage.output() as tmp:           # renamed into `out` only when the block succeeds
            save_pruned(pruned, tokenizer, plan, tmp)
        stage.finish(report, plots=files)     # metrics JSON, MLflow metrics and artifacts

`open_stage` gives the device, a checkpoint folder keyed by a fingerprint of the params and the
*contents* of every input (so a rerun resumes only into its own state), one MLflow run, and on
success removes the checkpoints. `stage_main` builds the `python -m stages.<name>` command line
from one declaration.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from slimforge import SlimforgeError
from slimforge.cli_util import exit_on_error, setup_logging
from slimforge.config import Schema, load_params
from slimforge.io import atomic_dir, content_hash, write_json
from slimforge.tracking import StageRun, flatten, stage_run


def pick_device(name: str = "auto") -> str:
    """'auto' is CUDA when there is a GPU, else the CPU; any other name is kept."""
    if name == "auto":
        import torch  # here, not at the top: `python -m stages.<name>` checks its params before torch loads

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def checkpoint_folder(out: str | Path, fingerprint: str) -> Path:
    """Where a stage keeps resumable state: beside its output, not in it (DVC deletes declared
    outputs before a stage runs). Emptied when it holds another run's state (other params or
    inputs): a run never resumes into state it did not make."""
    folder = Path(out).parent / ".checkpoints" / Path(out).name
    mark = folder / "fingerprint"
    if folder.exists() and (not mark.exists() or mark.read_text() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)
    return folder


@dataclass
class Stage:
    """One running stage: where it works and what it reports to."""

    name: str
    device: str
    out: Path
    checkpoints: Path
    fingerprint: str
    tracker: StageRun
    metrics_path: Path
    report_path: Path | None = None

    def output(self, out: str | Path | None = None):
        """An empty temporary folder that replaces `out` (default: the stage's output) only if the
        block succeeds: a killed stage never leaves a half-written output."""
        return atomic_dir(self.out if out is None else out)

    def logger(self, prefix: str = "") -> Callable[[int, dict], None]:
        """An `on_log(step, metrics)` callback for the training loop: per-step MLflow metrics."""
        return lambda step, m: self.tracker.log_step(step, {f"{prefix}{k}": v for k, v in m.items()})

    def finish(self, metrics: dict, plots: list[Path] = (), headline: list[str] | None = None) -> dict:
        """Write the metrics file (only the `headline` keys, see `select`: what `dvc metrics show`
        and `dvc exp show` compare) and the report (everything, timings and diagnostics included);
        log all numbers, both files and the plots to MLflow. Returns `metrics` whole."""
        write_json(self.metrics_path, select(metrics, headline) if headline else metrics)
        self.tracker.log_artifact(self.metrics_path)
        if self.report_path is not None:
            write_json(self.report_path, metrics)
            self.tracker.log_artifact(self.report_path)
        for f in plots:
            self.tracker.log_artifact(f, "plots")
        self.tracker.log_metrics(metrics)
        return metrics


def select(metrics: dict, keys: list[str]) -> dict:
    """The entries of nested `metrics` whose dotted name matches one of `keys` (shell patterns:
    'accuracy.*', 'results.*.accuracy_lora'), nested as they were. A key that matches nothing (a
    comparison the params turned off) is left out."""
    flat = flatten(metrics)
    out: dict = {}
    for key in keys:
        for name in (n for n in flat if fnmatch.fnmatchcase(n, key)):
            *parents, leaf = name.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = flat[name]
    return out


@contextmanager
def open_stage(name: str, params: dict, *, out: str | Path, inputs: list, metrics: str | Path,
               report: str | Path | None = None, device: str = "auto") -> Iterator[Stage]:
    """The context of one stage run (see the module docstring). `inputs`: Paths hashed by
    content, or in-memory values (records) hashed as JSON, into the resume fingerprint.
    `metrics` gets the headline numbers, `report` (when given) everything (see Stage.finish)."""
    fingerprint = content_hash(params, *inputs)
    checkpoints = checkpoint_folder(out, fingerprint)
    with stage_run(name, params, inputs) as tracker:
        yield Stage(name, pick_device(device), Path(out), checkpoints, fingerprint, tracker, Path(metrics),
                    None if report is None else Path(report))
    shutil.rmtree(checkpoints, ignore_errors=True)  # only after success: a failed run resumes from it


# What the common path flags mean; a stage's own flags say so in `help`.
COMMON_HELP = {"data": "the data stage's suite folder (data/tasks)", "out": "the stage's output folder",
               "metrics": "headline metrics JSON (what dvc metrics/exp show compare)",
               "report": "full report JSON: every number the stage measured, timings and diagnostics", "plots": "folder for the stage's plots (CSV and PNG)"}


def restore_hint(name: str, args: dict) -> str:
    """Under `dvc repro` the stage's outputs are already deleted when its params are checked: say
    how to get the previous ones back (models from DVC's cache, metrics and plots from git)."""
    if "DVC_STAGE" not in os.environ:
        return ""
    tracked = " ".join(str(args[k]) for k in ("metrics", "report", "plots") if args.get(k))
    git = f", `git checkout -- {tracked}` the metrics and plots" if tracked else ""
    return (f" (DVC removed this stage's previous outputs before running it: `dvc checkout {name}` restores"
            f" the cached ones{git})")


def stage_main(module: str, *, name: str, params: dict[str, type[Schema]], paths: list[str],
               optional: tuple[str, ...] = (), help: dict[str, str] | None = None,
               summary: Callable[[dict], str] | None = None, doc: str | None = None,
               argv: list[str] | None = None) -> None:
    """The command line of `python -m stages.<name>`: one `--<key> FILE` per params schema and one
    `--<path>` per path, passed to `module`'s `run` as keyword arguments named like the flags (dashes
    become underscores). Every params file is validated before `module` is imported (torch and
    transformers take seconds to load; a typo should not wait for them); a SlimforgeError prints one
    line and exits with status 2; `summary(metrics)` is printed (stdout) at the end. `argv` defaults
    to sys.argv."""
    help = {**COMMON_HELP, **(help or {})}
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in params:
        ap.add_argument(f"--{key.replace('_', '-')}", required=True, help=f"params/{name}.yaml" if key == "params"
                        else help.get(key, key))
    for key in paths:
        ap.add_argument(f"--{key.replace('_', '-')}", required=key not in optional, help=help.get(key, key))

    def main() -> None:
        args = vars(ap.parse_args(argv))
        setup_logging()  # stderr, SLIMFORGE_LOG_LEVEL (default INFO); progress as log lines outside a terminal
        try:
            loaded = {key: load_params(args.pop(key), schema) for key, schema in params.items()}
        except SlimforgeError as err:
            raise SlimforgeError(f"{err}{restore_hint(name, args)}") from None
        metrics = importlib.import_module(module).run(**loaded, **args)
        if summary is not None:
            print(summary(metrics))

    exit_on_error(main)
