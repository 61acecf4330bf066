"""The pipeline as a Prefect flow: one task per DVC stage, each running `dvc repro <stage>`.

DVC decides what is stale (no Prefect caching on top); Prefect adds retries, a run history, a
one-row-per-stage summary table and schedules. Stages that ran nest under one MLflow run; a flow
with nothing stale creates no MLflow run at all.

    python -m flows.pipeline                    # every stage, on Prefect's ephemeral local server
    python -m flows.pipeline data base          # these stages (DVC also runs what they depend on)
    python -m flows.pipeline --serve --cron "0 3 * * *"   # = `slimforge schedule`; needs `prefect server start`

A deployment for a work pool is in prefect.yaml (`prefect deploy --all`; the README says how).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

# Offline by design: Prefect's usage telemetry has nowhere to go, and on the temporary server it
# races the server's own sqlite writes ("database is locked" tracebacks in every run).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402  (after the setting above)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from slimforge.tracking import PARENT_ENV, pipeline_run  # noqa: E402

RUNNING = re.compile(r"Running stage '(.+)':")  # what `dvc repro` prints per stage it runs
CACHED = re.compile(r"Stage '(.+)' is cached - skipping run")
NPROC_ENV = "SLIMFORGE_NPROC"  # read by slimforge.distributed (not imported here: the flow does not load torch)


def dvc_stages(root: Path) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is an order DVC can run them in)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def stage_metrics(root: Path, stage: str) -> dict:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stale(root: Path, stage: str) -> bool:
    """Whether `dvc repro <stage>` has anything to do now, as far as DVC can tell before running it
    (`dvc status <stage> --with-deps`; a stage made stale by an upstream rerun shows up after it)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # targets resolve against the working directory: give the full address
        return bool(repo.status(targets=[f"{root / 'dvc.yaml'}:{stage}"], with_deps=True))


def headline(metrics: dict, limit: int = 100) -> str:
    """'accuracy_base=0.9466 ppl=1.029 ...': numeric values, top level first then one level down,
    cut to `limit` characters."""
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    items = [(k, v) for k, v in metrics.items() if numeric(v)]
    items += [(f"{k}.{k2}", v2) for k, v in metrics.items() if isinstance(v, dict)
              for k2, v2 in v.items() if numeric(v2)]
    text = " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}" for k, v in items)
    return text if len(text) <= limit else text[:limit - 2].rsplit(" ", 1)[0] + " …"


class BadInput(RuntimeError):
    """A stage refused its params or data (slimforge's one-line `error:`): a retry cannot help."""


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry crashes, kills and OOMs, never a stage's refusal of its input
    (DVC exits 255 whatever the stage's status, so the stage's own error line decides)."""
    return not isinstance(getattr(state, "data", None), BadInput)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=transient, task_run_name="dvc repro {stage}")
def repro(stage: str, parent_run_id: str, root: Path, nproc: int | None = None) -> dict[str, dict]:
    """Bring one stage up to date, its output streamed into Prefect's log; returns {stage: {status,
    seconds}} for each stage DVC ran or restored (on failure, the exception's `stages`). A crash, OOM or killed worker is retried (training
    stages resume from their last checkpoint, so a retry does not start over); bad params or data
    fail at once. `nproc`: processes per training stage (SLIMFORGE_NPROC; None: the environment's)."""
    logger = get_run_logger()
    env = {**os.environ, PARENT_ENV: parent_run_id, **({NPROC_ENV: str(nproc)} if nproc else {})}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done, errors, current, start = {}, [], None, time.monotonic()

    def finish(status):  # the stage running now (or the one asked for, if none started)
        done[current or stage] = {"status": status, "seconds": round(time.monotonic() - start, 1)}

    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        if m := RUNNING.match(line):
            if current:
                finish("ran")
            current, start = m.group(1), time.monotonic()
        elif m := CACHED.match(line):
            done[m.group(1)] = {"status": "restored from run cache", "seconds": 0.0}
        elif line.startswith("error: "):
            errors.append(line.removeprefix("error: "))
    if proc.wait() != 0:
        finish("failed")
        err = (BadInput(f"stage {stage}: {errors[-1]}") if errors else
               RuntimeError(f"dvc repro {stage} failed with exit status {proc.returncode} (its output is in the log)"))
        err.stages = done  # for the summary: what ran before the failure, and what failed
        raise err
    if current:
        finish("ran")
    return done


@flow(name="slimforge-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str | None = None, nproc: int | None = None) -> dict[str, dict]:
    """Bring `stages` (default: all of dvc.yaml) up to date in the repo at `root` (default: the
    working directory), in order; returns each stage's metrics (its status and seconds are in
    the summary table). `nproc` > 1 runs each training stage under torchrun with that many
    processes (slimforge.distributed; the same results, so DVC's cache still holds)."""
    logger = get_run_logger()
    root = Path(root or Path.cwd()).resolve()
    known = dvc_stages(root)
    stages = stages or known
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} (dvc.yaml has: {', '.join(known)})")
    # One tracking store for the flow and the stage subprocesses, wherever the flow was started.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    stages = [s for s in known if s in stages]  # dvc.yaml order: upstream first
    status = {s: {"status": "not run", "seconds": None} for s in stages}
    with ExitStack() as stack:
        parent = None
        try:
            for stage in stages:
                if status[stage]["status"] != "not run":
                    continue  # DVC already brought it up to date as an earlier stage's dependency
                if not stale(root, stage):
                    status[stage] = {"status": "up to date", "seconds": 0.0}
                    continue
                parent = parent or stack.enter_context(pipeline_run())  # opened by the first stale stage
                try:
                    ran = repro(stage, parent.run_id, root, nproc)
                    status.update({stage: {"status": "up to date", "seconds": 0.0}} | ran)
                except Exception as err:
                    status.update(getattr(err, "stages", {stage: {"status": "failed", "seconds": None}}))
                    raise
        finally:
            results = {s: {**status[s], "metrics": stage_metrics(root, s)} for s in known if s in status}
            summarize(results)
            report = root / "reports" / "report.md"  # the report stage's cross-stage table, when it ran
            if status.get("report", {}).get("status") == "ran" and report.is_file():
                create_markdown_artifact(key="slimforge-report", markdown=report.read_text(),
                                         description="The pipeline's models side by side (report stage)")
            ran = [s for s, r in results.items() if r["status"] == "ran"]
            if parent:
                parent.set_tags({"slimforge.stages_ran": ",".join(ran)})
                parent.log_metrics({s: results[s]["metrics"] for s in ran})
    if not parent:
        logger.info("everything up to date: no stage ran, no MLflow run was created")
    return {s: r["metrics"] for s, r in results.items()}


def summarize(results: dict[str, dict]) -> None:
    """The flow's table artifact: one row per stage with its status, seconds and headline metrics."""
    rows = [{"stage": s, "status": r["status"], "seconds": r["seconds"], "metrics": headline(r["metrics"])}
            for s, r in results.items()]
    create_table_artifact(key="slimforge-stage-metrics", table=rows, description="Each stage after `dvc repro`")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", help="stages to bring up to date (default: all)")
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead (Prefect's flow.serve)")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule for --serve (default nightly 03:00)")
    ap.add_argument("--name", default="nightly", help="deployment name for --serve")
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes (GPUs) per training stage, through torchrun (default: $SLIMFORGE_NPROC, else 1)")
    args = ap.parse_args(argv)
    if args.serve:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():  # without a server Prefect warns, then polls forever
            sys.exit("error: a schedule needs a Prefect server: run `prefect server start` in another shell, then "
                     "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and start this again")
        pipeline.serve(name=args.name, cron=args.cron, parameters={"stages": args.stages or None, "nproc": args.nproc})
    else:
        pipeline(args.stages or None, nproc=args.nproc)


if __name__ == "__main__":
    main()
