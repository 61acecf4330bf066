"""The Prefect flow retries what a retry can fix and nothing else, and refuses a schedule it
cannot keep. A toy DVC repo stands in for the pipeline, so these run in seconds."""

import subprocess
import sys

import pytest
import yaml

from flows.pipeline import BadInput, main, repro, transient
from tests.helpers import prefect_harness


def _toy_repo(tmp_path, cmd: str):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": {"cmd": cmd, "outs": ["out.txt"]}}}))
    return tmp_path


def _attempts(tmp_path) -> int:
    return len((tmp_path / "attempts").read_text()) if (tmp_path / "attempts").exists() else 0


def test_bad_input_fails_once_without_retries(tmp_path):
    from prefect import flow
    refuse = (f"{sys.executable} -c \"import sys; open('attempts', 'a').write('x'); "
              "print('error: params/toy.yaml: unknown key lerning_rate', file=sys.stderr); sys.exit(2)\"")
    root = _toy_repo(tmp_path, refuse)

    @flow
    def one(root):
        return repro(stage="toy", parent_run_id="none", root=root)

    with prefect_harness(), pytest.raises(BadInput, match="stage toy: params/toy.yaml: unknown key lerning_rate"):
        one(root)
    assert _attempts(tmp_path) == 1  # retries=2 would have made it 3


def test_retry_condition_separates_refusals_from_crashes():
    from prefect.states import Failed

    assert transient(None, None, Failed(data=BadInput("stage x: bad key"))) is False
    assert transient(None, None, Failed(data=RuntimeError("dvc repro x failed with exit status 255"))) is True


def test_serve_without_a_server_is_refused(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(SystemExit) as done:
        main(["--serve", "--cron", "0 3 * * *"])
    assert "prefect server start" in str(done.value.code)


def test_nproc_reaches_the_stage(tmp_path, monkeypatch):
    """`pipeline(nproc=N)` (`slimforge run --nproc N`) hands SLIMFORGE_NPROC to each stage's process."""
    from prefect import flow
    monkeypatch.delenv("SLIMFORGE_NPROC", raising=False)
    record = f"{sys.executable} -c \"import os; open('out.txt', 'w').write(os.environ.get('SLIMFORGE_NPROC', 'unset'))\""
    root = _toy_repo(tmp_path, record)

    @flow
    def one(root, nproc):
        return repro(stage="toy", parent_run_id="none", root=root, nproc=nproc)

    with prefect_harness():
        one(root, 3)
        assert (tmp_path / "out.txt").read_text() == "3"
        (tmp_path / "out.txt").unlink()
        one(root, None)
    assert (tmp_path / "out.txt").read_text() == "unset"
