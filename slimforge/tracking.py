"""MLflow tracking: each stage is one run in one store per checkout, whoever launched it.

    mlflow ui --backend-store-uri sqlite:///mlflow.db     # from the repo root: browse runs

Where runs go. MLFLOW_TRACKING_URI wins when set. Otherwise the store is `mlflow.db` at the repo
root: DVC's DVC_ROOT when DVC runs the stage (DVC sets it to the *original* repo also for
`dvc exp run --queue/--temp`, whose stage runs in a copy under `<repo>/.dvc/tmp/exps/`), else the
nearest folder above the working directory holding `.dvc/` or `.git`, with a `.dvc/tmp/exps/...`
tail cut off. So `dvc repro`, `dvc exp run`, queued experiments and the Prefect flow all land in
one store and a queued run's history is not lost with its temporary copy.

Where artifacts go. MLflow (3.x, sqlite store) fixes an experiment's `artifact_location` as an
absolute path when the experiment is created (a relative location is resolved against the working
directory then; the default is `./mlruns/<id>` of whatever directory the first run started in), and
each run's `artifact_uri` is that path plus the run id: there is no root-relative location. So for
a sqlite store slimforge creates the experiment itself with artifacts in `mlartifacts/<experiment>`
beside the database file, and when the store was moved or copied with its repo (the experiment's
artifact folder lies outside the store's folder) it renames the old experiment to
"<name> (artifacts in <old path>)", keeping its history readable, and creates a fresh one under the
new root: a moved or cloned repo never writes into the old path. Other stores (a server) decide
their artifact location themselves.

Tags on every run: `slimforge.stage`, `mlflow.source.git.commit` (MLflow's git context provider
sets it from the launching script; slimforge fills it from the repo root only when MLflow found
none, e.g. under pytest or the `slimforge` console script), `dvc.exp_name` and
`dvc.exp_baseline_rev` under `dvc exp run`, `dvc.stage` under DVC, `slimforge.dvc_lock` (content
hash of dvc.lock at run start), `slimforge.host` and `slimforge.pid`. Each input path is logged with
`mlflow.log_input` as a metadata-only dataset whose digest is its content hash.

Ends. A stage that raises ends FAILED; Ctrl-C or SIGTERM ends it KILLED (a SIGTERM handler raises
`Terminated` during the run, so `finally` blocks and atomic outputs clean up too). SIGKILL cannot be
caught: when a run starts, the store's RUNNING runs of this host whose pid is dead become KILLED.

When the Prefect flow launches a stage it exports SLIMFORGE_PARENT_RUN_ID, and the stage's run is
nested under the pipeline's run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimforge.io import content_hash, file_hash

DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"
EXPERIMENT = "slimforge"
PARENT_ENV = "SLIMFORGE_PARENT_RUN_ID"
EXPS_TMP = (".dvc", "tmp", "exps")  # where DVC runs queued and --temp experiments


def _outside_exp_copy(path: Path) -> Path:
    """`<repo>/.dvc/tmp/exps/<run>/...` -> `<repo>`; any other path unchanged."""
    parts = path.parts
    for i in range(len(parts) - len(EXPS_TMP) + 1):
        if parts[i:i + len(EXPS_TMP)] == EXPS_TMP:
            return Path(*parts[:i])
    return path


def workspace_root(start: str | Path | None = None) -> Path:
    """The checkout a stage runs in (for a queued experiment: its temporary copy): the nearest
    folder at or above `start` (default: the working directory) holding `.dvc/` or `.git`."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


def store_root(start: str | Path | None = None) -> Path:
    """The checkout whose store a run logs into: DVC_ROOT under DVC, else the workspace root,
    never a temporary experiment copy."""
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else workspace_root(start)
    return _outside_exp_copy(root.resolve())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / DB_NAME}"


def _sqlite_folder(uri: str) -> Path | None:
    """The folder of a sqlite store's database file (None for any other store)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve().parent


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params and metrics are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _local_path(location: str) -> Path | None:
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    return Path(local_file_uri_to_path(location)).resolve() if is_local_uri(location) else None


def _use_experiment(mlflow, client, name: str, uri: str) -> str:
    """Set (creating or relocating, see the module docstring) the experiment `name`; its id."""
    from mlflow.exceptions import MlflowException

    folder = _sqlite_folder(uri)
    location = str(folder / ARTIFACTS / name) if folder else None
    exp = client.get_experiment_by_name(name)
    if exp is not None and folder is not None:
        old = _local_path(exp.artifact_location)
        if old is not None and not old.is_relative_to(folder):  # the store moved with its repo
            try:
                client.rename_experiment(exp.experiment_id, f"{name} (artifacts in {old})")
            except MlflowException:
                pass  # a concurrent run renamed it first
            exp = None
    if exp is None:
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException:
            pass  # a concurrent run created it first
        exp = client.get_experiment_by_name(name)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def _mlflow():
    import mlflow  # slow to import (~3 s): only when a run starts

    # alembic prints every schema migration at INFO when a fresh sqlite store is created
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    users = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not users:
        # MLflow 3 also exports the URI it is given: the next run in this process (a moved repo,
        # another checkout) would read it back as the user's choice
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = mlflow.MlflowClient(uri)
    _use_experiment(mlflow, client, os.environ.get("SLIMFORGE_EXPERIMENT", EXPERIMENT), uri)
    return mlflow, client


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def mark_dead_runs_killed(client) -> list[str]:
    """RUNNING runs of this store started on this host by a process that no longer exists (a
    SIGKILL, an OOM kill, a lost machine) -> KILLED. Returns their run ids."""
    ids = [e.experiment_id for e in client.search_experiments()]
    host = socket.gethostname().replace("'", "")
    stale = client.search_runs(ids, f"attributes.status = 'RUNNING' and tags.`slimforge.host` = '{host}'",
                               max_results=1000) if ids else []
    dead = [r.info.run_id for r in stale
            if r.data.tags.get("slimforge.pid", "").isdigit() and not _alive(int(r.data.tags["slimforge.pid"]))]
    for run_id in dead:
        client.set_terminated(run_id, status="KILLED")
    return dead


class StageRun:
    """Thin handle on the active MLflow run: step metrics, final metrics, artifacts."""

    def __init__(self, mlflow, run):
        self._mlflow, self.run = mlflow, run
        self.run_id = run.info.run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metrics(self, metrics: dict) -> None:
        flat = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        self._mlflow.log_metrics(flat)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)


def _tags(name: str) -> dict[str, str]:
    from mlflow.tracking.context.default_context import _get_main_file
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    workspace = workspace_root()
    tags = {"slimforge.stage": name, "slimforge.host": socket.gethostname(), "slimforge.pid": str(os.getpid())}
    main = _get_main_file()  # what MLflow's git context provider reads the commit from
    if main is None or get_git_commit(main) is None:
        commit = get_git_commit(str(workspace))
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
    if (workspace / "dvc.lock").is_file():
        tags["slimforge.dvc_lock"] = file_hash(workspace / "dvc.lock")
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
                     ("DVC_STAGE", "dvc.stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _log_inputs(mlflow, inputs: list) -> None:
    """Each input path as a metadata-only dataset: its path and content hash, not its data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    workspace = workspace_root()
    datasets, tags = [], []
    for path in inputs:
        if not isinstance(path, Path) or not path.exists():
            continue  # in-memory values are part of the resume fingerprint only
        full = path.resolve()
        name = str(full.relative_to(workspace)) if full.is_relative_to(workspace) else str(full)
        digest = content_hash(full)
        with warnings.catch_warnings():  # "file" and "" both map to the local source: MLflow warns
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(full))
        datasets.append(MetaDataset(source, name=name, digest=digest[:36]))  # MLflow caps digests at 36
        tags.append({"sha256": digest})
    if datasets:
        mlflow.log_inputs(datasets, contexts=["input"] * len(datasets), tags_list=tags)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while a run is open; exits with 143 like an uncaught SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextmanager
def _run(name: str, nested_under: str | None, inputs: list = ()) -> Iterator[StageRun]:
    mlflow, client = _mlflow()
    mark_dead_runs_killed(client)
    tags = _tags(name)
    if nested_under:
        tags["mlflow.parentRunId"] = nested_under
    nested = mlflow.active_run() is not None  # a stage called in-process under a pipeline run
    run = mlflow.start_run(run_name=name, tags=tags, nested=nested)
    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        _log_inputs(mlflow, list(inputs))
        yield StageRun(mlflow, run)
    except (KeyboardInterrupt, Terminated):
        mlflow.end_run("KILLED")
        raise
    except SystemExit as e:
        mlflow.end_run("FINISHED" if e.code in (0, None) else "FAILED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def stage_run(stage: str, params: dict, inputs: list | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (nested under the pipeline's run when launched by the
    flow). `inputs`: the paths it reads, logged as datasets (other values are skipped)."""
    with _run(stage, os.environ.get(PARENT_ENV), inputs or ()) as run:
        # MLflow's log_params batches by 100 itself (MAX_PARAMS_TAGS_PER_BATCH)
        run._mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield run


@contextmanager
def pipeline_run(name: str = "pipeline") -> Iterator[StageRun]:
    """The parent run of a flow; stages started while it is open nest under it."""
    with _run(name, None) as run:
        yield run
