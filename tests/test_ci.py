"""The CI files: `.ci/run` runs the README's test command and the reproduction, and the experiment
workflow reproduces the committed graph on pull requests and experiment branches and posts the report
that `make reproduce` writes."""

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_tests_the_slow_tests_and_the_reproduction():
    commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-3:] == ["make test", "make test-slow", "make reproduce"]
    assert "make test" in (ROOT / "README.md").read_text()


def test_the_experiment_workflow_reproduces_and_posts_the_report_make_reproduce_writes():
    workflow = yaml.safe_load((ROOT / ".github/workflows/experiment.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["exp/**"]
    steps = workflow["jobs"]["reproduce"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert any(re.search(r"\bmake\b.*\breproduce\b", run) for run in runs)
    (report,) = re.findall(r"kiln report --out (\S+)", (ROOT / "Makefile").read_text())
    assert any(run.strip() == f"cml comment create --publish {report}" for run in runs)
    uploads = [step for step in steps if step.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and report in uploads[0]["with"]["path"]
    # torch comes from the CPU index, as on Kiln's CI: the multi-GB CUDA build is never pulled.
    assert any("--index-url https://download.pytorch.org/whl/cpu" in run for run in runs)


def test_make_installs_torch_from_the_index_a_user_names():
    # Off this project's machines the torch pin from PyPI is the CUDA build; TORCH_INDEX picks PyTorch's CPU index.
    def install_line(*args: str) -> str:
        dry = subprocess.run(["make", "-n", "-B", "venv", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return next(line for line in dry.stdout.splitlines() if "torch==" in line)

    cpu = "https://download.pytorch.org/whl/cpu"
    assert f'pip install --quiet --index-url "{cpu}" "torch==2.13.0"' in install_line(f"TORCH_INDEX={cpu}")
    assert "--index-url" not in install_line()
