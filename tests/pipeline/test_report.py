"""The reproduction report: metrics against the committed baseline, output hashes against dvc.lock."""

import json
import subprocess

import pytest
import yaml

from pipeline.report import build_report, compare_metrics

LOCK = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/kiln/kiln.safetensors", "md5": "aaa"}]},
                                      "cache": {"outs": [{"path": "data/latents", "md5": "bbb.dir"}]}}}
METRICS = {"steps": 4, "final_loss": 1.1453, "best_loss": 1.0844, "step": 4}


@pytest.fixture
def repo(tmp_path):
    git = ["git", "-c", "user.name=Kiln test", "-c", "user.email=test@kiln.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    (tmp_path / "models" / "kiln").mkdir(parents=True)
    (tmp_path / "models" / "kiln" / "metrics.json").write_text(json.dumps(METRICS))
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=tmp_path, check=True)
    (tmp_path / "models" / "kiln" / "loss.png").write_bytes(b"png")
    (tmp_path / "models" / "kiln" / "samples").mkdir()
    (tmp_path / "models" / "kiln" / "samples" / "step-00000004.png").write_bytes(b"png")
    return tmp_path


def test_an_identical_run_is_reproduced(repo):
    from pathlib import Path

    report = build_report(Path("models/kiln"), Path("reports/experiment.md"), root=repo)
    assert report.reproduced
    text = (repo / "reports" / "experiment.md").read_text()
    assert "**reproduced bit for bit**" in text and "| final_loss | 1.1453 | 1.1453 | +0 |" in text
    assert "Outputs in dvc.lock: 2, changed: 0." in text
    assert "![loss curve](../models/kiln/loss.png)" in text and "![step-00000004.png](../models/kiln/samples/step-00000004.png)" in text


def test_a_changed_output_or_metric_is_named(repo):
    from pathlib import Path

    changed = json.loads(json.dumps(LOCK))
    changed["stages"]["train"]["outs"][0]["md5"] = "ccc"
    (repo / "dvc.lock").write_text(yaml.safe_dump(changed))
    (repo / "models" / "kiln" / "metrics.json").write_text(json.dumps({**METRICS, "final_loss": 1.1454}))
    report = build_report(Path("models/kiln"), Path("reports/experiment.md"), root=repo)
    assert not report.reproduced
    assert report.changed_outputs == ["train: models/kiln/kiln.safetensors"]
    assert report.metric_failures == ["final_loss: 1.1453 -> 1.1454"]
    assert "**NOT reproduced**" in report.text
    # Within a stated tolerance (another CPU), the metric passes; the changed output still does not.
    loose = build_report(Path("models/kiln"), Path("reports/experiment.md"), tolerance=1e-3, root=repo)
    assert loose.metric_failures == [] and loose.changed_outputs


def test_metrics_compare_numbers_with_a_relative_tolerance():
    rows, failures = compare_metrics({"loss": 1.0, "steps": 4}, {"loss": 1.0 + 1e-9, "steps": 4, "new": 2.0}, 1e-6)
    assert failures == ["new: None -> 2.0"]
    assert ["loss", "1", "1", "+1e-09"] in rows
