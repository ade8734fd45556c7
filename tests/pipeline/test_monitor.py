"""Training logs: TensorBoard and dvclive files, and throughput over training steps only."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]



def test_run_logger_works_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    from pipeline.monitor import RunLogger

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    logger = RunLogger(tmp_path / "run", True)
    logger.scalars(1, {"loss": 0.5, "lr": 1e-4, "grad_norm": 2.0})
    logger.finish({"steps": 1, "final_loss": 0.5})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final_loss"] == 0.5
    assert (tmp_path / "run" / "plots" / "metrics" / "lr.tsv").read_text().splitlines() == ["step\tlr", "1\t0.0001"]
