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
import atexit
import fnmatch
import importlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from slimforge import SlimforgeError
from slimforge.cli_util import exit_on_error, setup_logging
from slimforge.config import Schema, load_params
from slimforge.io import atomic_dir, content_hash, write_json
from slimforge.tracking import StageRun, flatten, stage_run


def pick_device(name: str = "auto") -> str:
    """'auto' is CUDA when there is a GPU, else the CPU; any other name is kept, except that under
    torchrun 'auto' and 'cuda' are this process's own GPU (cuda:LOCAL_RANK)."""
    if name in ("auto", "cuda"):
        import torch  # here, not at the top: `python -m stages.<name>` checks its params before torch loads

        from slimforge import distributed

        if name == "auto" and not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{distributed.local_rank()}" if distributed.launched() else "cuda"
    return name


def checkpoint_path(out: str | Path) -> Path:
    """Where the stage writing `out` keeps resumable state (see checkpoint_folder)."""
    return Path(out).parent / ".checkpoints" / Path(out).name


def checkpoint_folder(out: str | Path, fingerprint: str) -> Path:
    """Where a stage keeps resumable state: beside its output, not in it (DVC deletes declared
    outputs before a stage runs). Emptied when it holds another run's state (other params or
    inputs): a run never resumes into state it did not make."""
    folder = checkpoint_path(out)
    mark = folder / "fingerprint"
    if folder.exists() and (not mark.exists() or mark.read_text() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)
    return folder


class NullRun:
    """A StageRun that logs nothing: what ranks other than 0 get under torchrun."""

    run_id = None

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metrics(self, metrics: dict) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass


@dataclass
class Stage:
    """One running stage: where it works and what it reports to."""

    name: str
    device: str
    out: Path
    checkpoints: Path
    fingerprint: str
    tracker: StageRun | NullRun
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
    from slimforge import distributed

    fingerprint = content_hash(params, *inputs)
    main = distributed.is_main()
    if main:
        checkpoint_folder(out, fingerprint)
    distributed.barrier()  # the other ranks read checkpoints only once rank 0 has emptied stale ones
    checkpoints = checkpoint_path(_WORKER_OUTPUTS.get(str(out), out))  # rank 0's, on every rank
    with stage_run(name, params, inputs) if main else nullcontext(NullRun()) as tracker:
        yield Stage(name, pick_device(device), Path(out), checkpoints, fingerprint, tracker, Path(metrics),
                    None if report is None else Path(report))
    if main:
        shutil.rmtree(checkpoints, ignore_errors=True)  # only after success: a failed run resumes from it


# Under torchrun, ranks other than 0 write their outputs into a scratch folder: {scratch path: real path}.
_WORKER_OUTPUTS: dict[str, Path] = {}
OUTPUT_FLAGS = ("out", "metrics", "report", "plots")


def join_ranks(args: dict) -> None:
    """Join torchrun's process group (when launched by it); on ranks other than 0, point the
    output flags of `args` at a scratch folder deleted at exit and quiet the logs to warnings, so
    only rank 0 writes and reports."""
    from slimforge import distributed

    distributed.init()
    if distributed.is_main():
        return
    setup_logging("WARNING")
    scratch = Path(tempfile.mkdtemp(prefix=f"slimforge-rank{distributed.rank()}-"))
    atexit.register(shutil.rmtree, scratch, True)
    for flag in OUTPUT_FLAGS:
        if args.get(flag):
            real = Path(args[flag])
            args[flag] = str(scratch / real.name)
            _WORKER_OUTPUTS[args[flag]] = real


def relaunch(name: str, argv: list[str]) -> None:
    """With SLIMFORGE_NPROC=N > 1 and not yet under torchrun: replace this process by
    `torchrun --standalone --nproc-per-node N -m stages.<name> <argv>` (exit status and signals pass
    through). Otherwise return."""
    from slimforge import distributed

    nproc = distributed.requested_nproc()
    if nproc > 1 and not distributed.launched():
        command = distributed.relaunch_command(f"stages.{name}", argv, nproc)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)


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
               argv: list[str] | None = None, trains: bool = False) -> None:
    """The command line of `python -m stages.<name>`: one `--<key> FILE` per params schema and one
    `--<path>` per path, passed to `module`'s `run` as keyword arguments named like the flags (dashes
    become underscores). Every params file is validated before `module` is imported (torch and
    transformers take seconds to load; a typo should not wait for them); a SlimforgeError prints one
    line and exits with status 2; `summary(metrics)` is printed (stdout) at the end. `argv` defaults
    to sys.argv. `trains`: the stage trains, so SLIMFORGE_NPROC > 1 runs it under torchrun."""
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
        if trains:  # training stages run under torchrun when SLIMFORGE_NPROC > 1 (slimforge.distributed)
            relaunch(name, sys.argv[1:] if argv is None else argv)
            join_ranks(args)
        metrics = importlib.import_module(module).run(**loaded, **args)
        if summary is not None and not _WORKER_OUTPUTS:
            print(summary(metrics))

    exit_on_error(main)
