"""Parameter sweeps on DVC experiments, and the compression Pareto frontier: which recipe to ship.

    python -m flows.sweep                                   # params/sweep.yaml: run, then frontier + registry
    python -m flows.sweep --params my.yaml --dry-run        # check the grid and list its points only
    python -m flows.sweep --serve --cron "0 4 * * 0"        # schedule it (needs `prefect server start`)

Each point is one `dvc exp run --temp -n <point> -S key=value ...`: a full `dvc repro` in a
temporary copy of the workspace in which DVC restores every stage whose deps and params did not
change from its cache instead of rerunning it, so a grid over late-stage knobs costs only the late
stages. Points land as DVC experiments on the current commit (`dvc exp show` is the table). They run
`jobs` at a time, each retried `retries` times on a crash; a point whose experiment already exists
on this commit is skipped, so rerunning a killed sweep finishes only the missing points. Then the
report stage's `reports/report.json` of each point gives the candidates (point x model); their Pareto
frontiers (accuracy vs MB on disk, vs decode tokens/s) go to `<out>/<name>/frontier.{md,png}` and
`points.json`, a Prefect artifact and an MLflow run. The most accurate candidate within `budget` has
its point rerun with `register_model: true`, so the package stage's own registry path registers it
as `challenger` (champion moves only when it beats the champion's interval, as in any run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flows.pipeline import RUNNING  # first: it also turns Prefect's telemetry off before prefect loads
from flows.sweep_params import NO_REGISTER, SweepParams, expand_grid, yaml_value
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from slimforge import SlimforgeError, pareto
from slimforge.config import load_params


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def finished_points(root: Path) -> dict[str, str]:
    """{experiment name: ref} of the experiments DVC holds on the current commit."""
    head = _git(root, "rev-parse", "HEAD")
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps/").splitlines()
    out = {}
    for ref in refs:  # refs/exps/<2 hex>/<38 hex>/<name>: the baseline commit, then the name
        parts = ref.split("/")
        if len(parts) == 5 and parts[2] + parts[3] == head:
            out[parts[4]] = ref
    return out


@task(task_run_name="point {name}")
def run_point(name: str, overrides: dict, root: Path) -> dict:
    """One `dvc exp run --temp`; its output streamed to Prefect's log. Returns {name, status, seconds}."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={yaml_value(value)}"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ran = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        if m := RUNNING.match(line):
            ran.append(m.group(1))
    if proc.wait() != 0:
        raise RuntimeError(f"point {name}: dvc exp run failed with exit status {proc.returncode} (see its log)")
    return {"name": name, "status": "ran", "stages_ran": ran, "seconds": round(time.monotonic() - started, 1)}


def candidates(root: Path, points: list[dict], refs: dict[str, str], models: list[str]) -> list[dict]:
    """One dict per (point, model) from each point's reports/report.json (its experiment commit):
    `accuracy` is the base families' val accuracy (what the frontier and the budget pick use), `test`
    the test accuracy with its interval, reported beside it."""
    out = []
    for p in points:
        report = json.loads(_git(root, "show", f"{refs[p['name']]}:reports/report.json"))
        for key in models:
            row = report["models"][key]
            val, test = row["val"], row["base families"]  # select on val; test is only reported
            out.append({"point": p["name"], "params": p["overrides"], "model": key, "accuracy": val["value"],
                        "lo": val["lo"], "hi": val["hi"], "n": val["n"], "test": test, "bytes": row["bytes"],
                        "bits": row["bits"], **({"tokens_per_s": row["tokens_per_s"]} if "tokens_per_s" in row else {})})
    return out


def write_frontier(cands: list[dict], folder: Path, label_keys: list[str]) -> dict:
    """frontier.md, frontier.png and points.json in `folder`; returns the frontier masks and the table."""
    on_size = pareto.frontier(cands, "bytes")
    speed = all("tokens_per_s" in c for c in cands)
    on_speed = pareto.frontier(cands, "tokens_per_s") if speed else None
    table = pareto.markdown(cands, on_size, on_speed, label_keys)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frontier.md").write_text(table + "\n")
    pareto.plot(cands, on_size, on_speed, folder / "frontier.png")
    rows = [{**c, "frontier_size": f, **({"frontier_speed": on_speed[i]} if speed else {})}
            for i, (c, f) in enumerate(zip(cands, on_size))]
    (folder / "points.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {"table": table, "on_size": on_size, "on_speed": on_speed}


def register_best(root: Path, best: dict) -> dict:
    """Rerun the best point with register_model on: package reruns and registers (upstream stages
    that differ from the baseline rerun too: DVC's run cache cannot restore them, see README Sweeps)."""
    name = f"{best['point']}-registered"
    if name not in finished_points(root):
        run_point.fn(name, {**best["params"], "params/package.yaml:register_model": True}, root)
    ref = finished_points(root)[name]
    package = json.loads(_git(root, "show", f"{ref}:reports/package.json"))
    return {"experiment": name, "candidate": f"{best['point']}:{best['model']}", "registered": package.get("registry")}


@flow(name="slimforge-sweep", log_prints=True)
def sweep(params_file: str = "params/sweep.yaml", root: str | None = None) -> dict:
    """Run the grid of `params_file` in the repo at `root` (default: the working directory); returns
    {"points": [...], "frontier": folder, "best": ..., "registered": ...}."""
    logger = get_run_logger()
    root = Path(root or Path.cwd()).resolve()
    params = load_params(root / params_file, SweepParams)
    points = expand_grid(params, root)  # bad keys or values fail here, before any point runs
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    done = finished_points(root)
    todo = [p for p in points if p["name"] not in done]
    logger.info("%d points, %d already finished on this commit, %d to run, %d at a time",
                len(points), len(points) - len(todo), len(todo), params.jobs)
    point_task = run_point.with_options(retries=params.retries, retry_delay_seconds=5)
    status = []
    for start in range(0, len(todo), params.jobs):  # `jobs` at a time: each point is a whole dvc repro
        wave = [point_task.submit(p["name"], {**p["overrides"], **NO_REGISTER}, root) for p in todo[start:start + params.jobs]]
        status += [f.result() for f in wave]
    status += [{"name": p["name"], "status": "finished before"} for p in points if p["name"] in done]
    refs = finished_points(root)
    cands = candidates(root, points, refs, params.models)
    folder = root / params.out / params.name
    front = write_frontier(cands, folder, list(params.grid))
    create_markdown_artifact(front["table"], key=f"sweep-{params.name.lower().replace('_', '-')}",
                             description=f"sweep {params.name}: candidates and Pareto frontier")
    budget = params.budget
    index = pareto.best_under_budget(cands, None if budget.max_mb is None else budget.max_mb * 1e6,
                                     budget.min_tokens_per_s)
    best = None if index is None else cands[index]
    registered = register_best(root, best) if best is not None and params.register_best else None
    if best is None:
        logger.warning("no candidate within the budget %s: nothing registered", budget.model_dump())
    _log_mlflow(params, folder, status, cands, front, best)
    return {"points": status, "frontier": str(folder), "best": best, "registered": registered}


def _log_mlflow(params: SweepParams, folder: Path, status: list[dict], cands: list[dict], front: dict,
                best: dict | None) -> None:
    import mlflow

    mlflow.set_experiment("slimforge-sweeps")
    with mlflow.start_run(run_name=f"sweep {params.name}"):
        mlflow.log_params({"grid": json.dumps(params.grid), "models": ",".join(params.models),
                           "budget": json.dumps(params.budget.model_dump())})
        mlflow.log_metrics({"points": len(status), "candidates": len(cands),
                            "frontier_size": sum(front["on_size"]),
                            **({"best_accuracy": best["accuracy"], "best_bytes": best["bytes"]} if best else {})})
        mlflow.log_artifacts(str(folder), artifact_path="sweep")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/sweep.yaml", help="the sweep's params file")
    ap.add_argument("--dry-run", action="store_true", help="check the grid and list its points; run nothing")
    ap.add_argument("--serve", action="store_true", help="serve the flow on a schedule (with --cron)")
    ap.add_argument("--cron", default="0 4 * * 0")
    args = ap.parse_args()
    try:
        params = load_params(args.params, SweepParams)
        points = expand_grid(params)
    except SlimforgeError as err:
        sys.exit(f"error: {err}")
    if args.dry_run:
        for p in points:
            print(p["name"], " ".join(f"{k}={yaml_value(v)}" for k, v in p["overrides"].items()))
        return
    if args.serve:
        sweep.serve(name="slimforge-sweep", cron=args.cron, parameters={"params_file": args.params})
        return
    result = sweep(params_file=args.params)
    print(f"frontier: {result['frontier']}/frontier.md; best within budget: "
          + (f"{result['best']['point']}:{result['best']['model']} {result['best']['accuracy']:.3f}"
             if result["best"] else "none"))


if __name__ == "__main__":
    main()
