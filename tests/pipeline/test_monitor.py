"""Training logs: TensorBoard and dvclive files, and throughput over training steps only."""

import json
import subprocess
import sys

import pytest

from pipeline.train import run
from tests.conftest import params_for, train_paths


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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_training_steps_only():
    from pipeline.monitor import Throughput

    clock = FakeClock()
    throughput = Throughput(clock)
    clock.now = 5.0  # the first step: allocation and kernel choice, not counted
    throughput.step_done(4)
    assert throughput.images_per_second == 0.0
    clock.now += 2.0
    throughput.step_done(4)
    with throughput.excluding("samples"):
        clock.now += 30.0  # drawing samples between two steps
    clock.now += 2.0
    throughput.step_done(4)
    with throughput.excluding("validation"):
        clock.now += 7.0
    with throughput.excluding("samples"):
        clock.now += 1.0
    clock.now += 4.0
    throughput.step_done(4)
    assert throughput.images == 12 and throughput.seconds == 8.0
    assert throughput.images_per_second == 1.5
    assert dict(throughput.other_seconds) == {"samples": 31.0, "validation": 7.0}


def test_the_trainer_times_steps_not_samples(sd15, tmp_path, monkeypatch):
    # Every training step takes 1 s of the fake clock, every sample grid 100 s: images/s must be
    # batch_size / 1 s, in perf.json, not in the judged metrics.
    import time

    import pipeline.train as train
    from pipeline.samples import Sampler

    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    real_micro_step, real_draw = train.micro_step, Sampler.draw

    def one_second_steps(t, batch, global_step):
        clock.now += 1.0
        return real_micro_step(t, batch, global_step)

    def slow_samples(self, *args, **kwargs):
        clock.now += 100.0
        return real_draw(self, *args, **kwargs)

    monkeypatch.setattr(train, "micro_step", one_second_steps)
    monkeypatch.setattr(Sampler, "draw", slow_samples)
    project, plan = sd15
    prompt = {"prompt": "sks circle", "seed": 1, "steps": 1, "width": 32, "height": 32}
    settings = params_for("tiny-sd15", max_train_steps=4, batch_size=2, sample_prompts=[prompt], sample_every_n_steps=1)
    result = run(settings, train_paths(project, plan, tmp_path))
    assert result.images_per_second == pytest.approx(2.0)
    metrics = json.loads((tmp_path / "kiln" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "images_per_second" not in metrics
    perf = json.loads((tmp_path / "kiln" / "perf.json").read_text())  # throughput apart from the judged metrics
    assert perf["images_per_second"] == pytest.approx(2.0) and perf["seconds_outside_steps"]["samples"] == pytest.approx(400.0)


def test_metrics_json_holds_the_summary_alone_and_the_plots_every_step(tmp_path):
    from pipeline.monitor import RunLogger

    logger = RunLogger(tmp_path / "run", True)
    for step in (1, 2, 3, 4):
        logger.scalars(step, {"loss": 1.0 / step, "lr": 1e-4})
    logger.finish({"steps": 4, "final_loss": 0.25, "best_loss": 0.25})
    # What `dvc exp show` lists: the judged metrics, not dvclive's copy of the last loss, lr and step.
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"steps": 4, "final_loss": 0.25, "best_loss": 0.25}
    assert (tmp_path / "run" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[-1] == "4\t0.25"


def test_timesteps_log_is_written_with_its_schema(tmp_path):
    from pipeline.monitor import write_timesteps
    from pipeline.tables import read_table

    rows = [{"global_step": 0, "image_id": "a", "is_reg": False, "timestep": 17}]
    write_timesteps(rows, tmp_path / "logs" / "timesteps.parquet")
    assert read_table(tmp_path / "logs" / "timesteps.parquet") == rows


def test_the_loss_curve_png_is_deterministic(tmp_path):
    from PIL import Image

    from pipeline.monitor import draw_loss_curve

    losses = [1.2, 1.1, 1.15, 0.9, 0.95, 0.8]
    first = draw_loss_curve(losses, [(3, 1.0), (6, 0.85)], tmp_path / "a.png")
    second = draw_loss_curve(losses, [(3, 1.0), (6, 0.85)], tmp_path / "b.png")
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as image:
        assert image.size == (640, 360)
        blue = sum(1 for pixel in image.getdata() if pixel == (31, 119, 180))
        orange = sum(1 for pixel in image.getdata() if pixel == (255, 127, 14))
    assert blue > 100 and orange > 10  # the curve and the validation points are drawn
    assert draw_loss_curve(losses[:3], [], tmp_path / "c.png").read_bytes() != first.read_bytes()
