"""The experiment report `make reproduce` writes: this run's metrics against the committed baseline, every
output hash against the committed dvc.lock, the loss curve and the sample grid, as Markdown (what CI
posts on a pull request)."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Report:
    text: str
    metric_failures: list[str] = field(default_factory=list)
    changed_outputs: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return not self.metric_failures and not self.changed_outputs


def committed(path: Path, revision: str = "HEAD", cwd: Path = Path(".")) -> str | None:
    """The text of `path` at `revision` in git, or None where git has no such file."""
    done = subprocess.run(["git", "show", f"{revision}:{path.as_posix()}"], cwd=cwd, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def output_hashes(lock: dict[str, Any]) -> dict[str, str]:
    """`stage: path` -> md5 for every output dvc.lock records."""
    return {
        f"{stage}: {out['path']}": out.get("md5", "")
        for stage, spec in (lock.get("stages") or {}).items()
        for out in spec.get("outs", [])
    }


def compare_metrics(baseline: dict[str, Any], current: dict[str, Any], tolerance: float) -> tuple[list[list[str]], list[str]]:
    """Table rows (metric, baseline, this run, delta) and the metrics outside `tolerance` (relative)."""
    rows, failures = [], []
    for name in sorted(set(baseline) | set(current)):
        old, new = baseline.get(name), current.get(name)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)):
            delta = new - old
            rows.append([name, f"{old:.6g}", f"{new:.6g}", f"{delta:+.3g}"])
            if not math.isclose(new, old, rel_tol=tolerance, abs_tol=0.0):
                failures.append(f"{name}: {old!r} -> {new!r}")
        else:
            rows.append([name, str(old), str(new), ""])
            if old != new:
                failures.append(f"{name}: {old!r} -> {new!r}")
    return rows, failures


def build_report(run_dir: Path, out: Path, tolerance: float = 0.0, revision: str = "HEAD", root: Path = Path(".")) -> Report:
    """Compare the workspace (dvc.lock, run_dir/metrics.json) with `revision` and write the report to `out`."""
    metrics_path = run_dir / "metrics.json"
    current = json.loads((root / metrics_path).read_text()) if (root / metrics_path).is_file() else {}
    baseline_text = committed(metrics_path, revision, root)
    baseline = json.loads(baseline_text) if baseline_text else {}
    rows, metric_failures = compare_metrics(baseline, current, tolerance)
    if not baseline_text:
        metric_failures = [f"{metrics_path}: no committed baseline at {revision}"]
    lock_text = committed(Path("dvc.lock"), revision, root)
    before = output_hashes(yaml.safe_load(lock_text) or {}) if lock_text else {}
    after = output_hashes(yaml.safe_load((root / "dvc.lock").read_text()) or {}) if (root / "dvc.lock").is_file() else {}
    changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))

    lines = ["# Kiln experiment report", ""]
    verdict = "reproduced bit for bit" if not changed and not metric_failures else "NOT reproduced"
    lines += [f"Against `{revision}`: **{verdict}**.", ""]
    lines += ["| metric | baseline | this run | delta |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines += ["", f"Outputs in dvc.lock: {len(after)}, changed: {len(changed)}."]
    lines += [f"- changed: `{key}`" for key in changed]
    lines += [f"- metric outside tolerance {tolerance:g}: {failure}" for failure in metric_failures]
    relative = Path(*[".."] * len(out.parent.parts)) if out.parent.parts else Path(".")
    loss_png = run_dir / "loss.png"
    if (root / loss_png).is_file():
        lines += ["", "## Loss", "", f"![loss curve]({(relative / loss_png).as_posix()})"]
    samples = sorted((root / run_dir / "samples").glob("*.png"))
    if samples:
        latest = samples[-1].relative_to(root)
        lines += ["", "## Samples", "", f"![{latest.name}]({(relative / latest).as_posix()})"]
    text = "\n".join(lines) + "\n"
    (root / out).parent.mkdir(parents=True, exist_ok=True)
    (root / out).write_text(text)
    return Report(text, metric_failures, changed)
