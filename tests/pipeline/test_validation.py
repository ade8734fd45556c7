"""Validation: held-out images never trained on, a stable curve, the active objective."""

from pathlib import Path

import pytest

from pipeline.train import run
from tests.conftest import params_for, train_paths

ROOT = Path(__file__).resolve().parents[2]



def test_validation_loss_is_held_out_stable_and_logged(sd15, tmp_path):
    from pipeline.tables import read_table
    from pipeline.validation import held_out

    project, plan = sd15
    holdout = held_out(read_table(plan), 0.3)
    assert 0 < len(holdout) < 14 and held_out(read_table(plan), 0.3) == holdout
    settings = {"max_train_steps": 3, "validation_split": 0.3, "validate_every": 1, "log_timesteps": True, "learning_rate": 1e-3}
    first = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path / "a"))
    second = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path / "b"))
    assert len(first.validation_losses) == 3 and all(loss > 0 for loss in first.validation_losses)
    assert first.validation_losses == second.validation_losses  # fixed noise and timesteps
    trained_on = {row["image_id"] for row in read_table(tmp_path / "a" / "kiln" / "logs" / "timesteps.parquet")}
    assert not trained_on & holdout
    rows = (tmp_path / "a" / "kiln" / "plots" / "metrics" / "validation_loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tvalidation_loss" and len(rows) == 4


def test_validation_folder_is_never_trained_on(sd15, tmp_path):
    from pipeline.errors import KilnError
    from pipeline.tables import read_table

    project, plan = sd15
    rows = read_table(plan)
    folder = next(row["path"] for row in rows if not row["is_reg"]).rsplit("/", 1)[0]
    held = {row["image_id"] for row in rows if row["path"].startswith(folder + "/")}
    settings = {"max_train_steps": 2, "validation_folder": folder, "validate_every": 1, "log_timesteps": True, "batch_size": 1}
    result = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path))
    assert len(result.validation_losses) == 2 and all(loss > 0 for loss in result.validation_losses)
    trained_on = {row["image_id"] for row in read_table(tmp_path / "kiln" / "logs" / "timesteps.parquet")}
    assert trained_on and not trained_on & held
    with pytest.raises(KilnError, match="train.validation_folder: no planned image is under 'nowhere'"):
        run(params_for("tiny-sd15", validation_folder="nowhere"), train_paths(project, plan, tmp_path / "b"))
