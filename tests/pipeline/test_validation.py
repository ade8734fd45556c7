"""Validation: held-out images never trained on, a stable curve, the active objective."""


import pytest
import torch

from pipeline.train import run
from tests.conftest import params_for, train_paths


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


def test_the_validator_measures_the_reloaded_objective(sd15, tmp_path, monkeypatch):
    # load_settings_every_epoch turns min_snr_gamma on at the second epoch: the validation after that
    # must use the rebuilt objective, as training does. A plan of 4 train images, each once per epoch.
    from pipeline.balance import PLAN_SCHEMA
    from pipeline.objective import DiffusionObjective
    from pipeline.tables import read_table, write_table
    from pipeline.train import TrainPaths
    from pipeline.validation import held_out

    project, plan = sd15
    rows = [row for row in read_table(plan) if not row["is_reg"]]
    bucket = rows[0]["bucket"]
    small = [{**row, "repeats": 1.0} for row in rows if row["bucket"] == bucket][:4]
    assert len(small) == 4
    write_table(small, PLAN_SCHEMA, tmp_path / "plan.parquet")

    seen = []
    real_loss = DiffusionObjective.compute_loss

    def spy_loss(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), self.loss_settings.min_snr_gamma))
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "compute_loss", spy_loss)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  min_snr_gamma: 5.0\n")
    settings = params_for(
        "tiny-sd15", batch_size=1, max_train_steps=6, validation_split=0.5, validate_every=5, load_settings_every_epoch=True,
    )
    assert 0 < len(held_out(small, 0.5)) < 4  # some images validate, the others train, one per step
    paths = TrainPaths(tmp_path / "plan.parquet", project.paths.store, project.paths.store / "index.parquet", tmp_path / "models", params_file)
    result = run(settings, paths)
    assert len(result.validation_losses) == 2  # steps 5 and 6 (the last)
    training = [gamma for grad, gamma in seen if grad]
    validation = [gamma for grad, gamma in seen if not grad]
    assert training[0] is None and training[-1] == 5.0  # reloaded for the second epoch
    assert validation and set(validation) == {5.0}
