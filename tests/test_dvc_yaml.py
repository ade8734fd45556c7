"""dvc.yaml against the code it runs: every stage lists the import closure of its command, so an edit to
any module a stage runs reruns that stage (litgpt and torchtune test every shipped config the same way)."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """pipeline.x -> pipeline/x.py, pipeline -> pipeline/__init__.py; None outside Kiln's packages."""
    parts = name.split(".")
    if parts[0] not in ("pipeline", "stages"):
        return None
    path = ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(path: Path) -> set[Path]:
    """Kiln modules a file imports, anywhere in it (lazy imports inside functions count: they run)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = module_file(name)
            if file is not None and file.is_file():
                found.add(file)
                # Importing pipeline.x runs pipeline/__init__.py first.
                found.add(ROOT / name.split(".")[0] / "__init__.py")
    return found


def closure(entry: Path) -> set[str]:
    """The files `entry` runs: itself and everything it imports, transitively."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported(path) - seen)
    return {path.relative_to(ROOT).as_posix() for path in seen}


def test_the_closure_follows_lazy_and_package_imports():
    files = closure(ROOT / "stages" / "train.py")
    assert {"pipeline/train.py", "pipeline/step.py", "pipeline/noise.py", "stages/common.py"} <= files
    assert "pipeline/__init__.py" in files  # the version written into the metadata
    assert "pipeline/samples.py" in files and "pipeline/models.py" in files  # imported inside functions too


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_every_module_it_runs(stage):
    spec = STAGES[stage]
    command = spec["cmd"].split()
    assert command[:2] == ["kiln", stage], f"dvc.yaml: stage {stage} runs {spec['cmd']!r}, not `kiln {stage}`"
    # `kiln` (stages/cli.py) only dispatches to stages/<stage>.py, so the closure starts there.
    expected = closure(ROOT / "stages" / f"{stage}.py")
    listed = [dep for dep in spec.get("deps", []) if isinstance(dep, str) and dep.endswith(".py")]
    assert len(listed) == len(set(listed)), f"dvc.yaml: stage {stage} lists {sorted({d for d in listed if listed.count(d) > 1})} twice"
    declared = set(listed)
    missing, extra = sorted(expected - declared), sorted(declared - expected)
    assert not missing and not extra, f"dvc.yaml: stage {stage}: add deps {missing}; remove deps {extra}"


def test_each_stage_declares_every_param_it_reads(tmp_path, monkeypatch):
    # Run the demo graph through the `kiln` command in-process, recording each stage's params reads.
    # (Reads inside worker processes are not seen, so the graph runs with one worker.)
    import shutil

    from typer.testing import CliRunner

    from pipeline.params import recording_reads
    from stages.cli import app

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["demo-data"]).exit_code == 0
    quick = ["--set", "scan.workers=1", "--set", "train.workers=0", "--set", "train.max_train_steps=2"]
    for stage in ("scan", "caption", "tag", "bucket", "cache", "balance", "train"):
        with recording_reads() as reads:
            result = runner.invoke(app, [stage, *quick])
        assert result.exit_code == 0, result.output
        declared = STAGES[stage].get("params", [])
        undeclared = sorted(key for key in reads if not any(key == name or key.startswith(name + ".") for name in declared))
        assert not undeclared, f"dvc.yaml: stage {stage} reads params it does not declare: {undeclared}"


def test_train_declares_what_its_params_hash_covers():
    from pipeline.train import PARAMS

    assert STAGES["train"]["params"] == list(PARAMS)


def test_declared_values_are_sections_and_keys():
    from pipeline.params import declared_values, validate_params

    params = validate_params({"bucket": {"resolution": 768}, "model": {"base": "tiny-sdxl"}})
    values = declared_values(params, ["model", "bucket.resolution"])
    assert values["bucket.resolution"] == [768, 768] and values["model"]["base"] == "tiny-sdxl"
