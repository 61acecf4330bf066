"""The pipeline as a Prefect flow: one task per DVC stage, each running `dvc repro <stage>`.

DVC decides what is stale (no Prefect caching on top); Prefect adds retries, a run history, a
table artifact of the stage metrics and schedules. All stage runs nest under one MLflow run.

    python -m flows.pipeline                    # every stage, on Prefect's ephemeral local server
    python -m flows.pipeline data base          # these stages (DVC also runs what they depend on)
    python -m flows.pipeline --serve --cron "0 3 * * *"   # nightly; needs `prefect server start`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# Offline by design: Prefect's usage telemetry has nowhere to go, and on the temporary server it
# races the server's own sqlite writes ("database is locked" tracebacks in every run).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402  (after the setting above)
from prefect.artifacts import create_table_artifact  # noqa: E402

from slimforge.tracking import PARENT_ENV, flatten, pipeline_run



def dvc_stages(root: Path) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is an order DVC can run them in)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def stage_metrics(root: Path, stage: str) -> dict:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


class BadInput(RuntimeError):
    """A stage refused its params or data (slimforge's one-line `error:`): a retry cannot help."""


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry crashes, kills and OOMs, never a stage's refusal of its input
    (DVC exits 255 whatever the stage's status, so the stage's own error line decides)."""
    return not isinstance(getattr(state, "data", None), BadInput)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=transient, task_run_name="dvc repro {stage}")
def repro(stage: str, parent_run_id: str, root: Path) -> dict:
    """Bring one stage up to date, its output streamed into Prefect's log. A crash, OOM or killed
    worker is retried (training stages resume from their last checkpoint, so a retry does not start
    over); bad params or data fail at once."""
    logger = get_run_logger()
    env = {**os.environ, PARENT_ENV: parent_run_id}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    errors = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        if line.startswith("error: "):
            errors.append(line.removeprefix("error: "))
    if proc.wait() != 0:
        if errors:
            raise BadInput(f"stage {stage}: {errors[-1]}")
        raise RuntimeError(f"dvc repro {stage} failed with exit status {proc.returncode} (its output is in the log)")
    return stage_metrics(root, stage)


def metrics_table(results: dict[str, dict]) -> list[dict]:
    """One row per (stage, metric) with a numeric value."""
    return [{"stage": stage, "metric": key, "value": round(float(value), 6)}
            for stage, metrics in results.items()
            for key, value in flatten(metrics).items() if isinstance(value, (int, float))]


@flow(name="slimforge-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str | None = None) -> dict[str, dict]:
    """Run `stages` (default: all of dvc.yaml) in the repo at `root` (default: the working
    directory), in order; returns each stage's metrics."""
    root = Path(root or Path.cwd()).resolve()
    known = dvc_stages(root)
    stages = stages or known
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} (dvc.yaml has: {', '.join(known)})")
    # One tracking store for the flow and the stage subprocesses, wherever the flow was started.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    results = {}
    with pipeline_run() as parent:
        for stage in stages:
            results[stage] = repro(stage, parent.run_id, root)
        rows = metrics_table(results)
        create_table_artifact(key="slimforge-stage-metrics", table=rows,
                              description="Metrics of each stage after `dvc repro`")
        parent.log_metrics({f"{r['stage']}.{r['metric']}": r["value"] for r in rows})
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", help="stages to bring up to date (default: all)")
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule for --serve (default nightly 03:00)")
    ap.add_argument("--name", default="nightly", help="deployment name for --serve")
    args = ap.parse_args(argv)
    if args.serve:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():  # without a server Prefect warns, then polls forever
            sys.exit("error: a schedule needs a Prefect server: run `prefect server start` in another shell, then "
                     "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and start this again")
        pipeline.serve(name=args.name, cron=args.cron, parameters={"stages": args.stages or None})
    else:
        pipeline(args.stages or None)


if __name__ == "__main__":
    main()
