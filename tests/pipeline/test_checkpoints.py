"""Checkpoints: exact resume (weights, EMA), the --resume resolver and the seed rule."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.train import run
from tests.conftest import params_for, train_paths

ROOT = Path(__file__).resolve().parents[2]



def test_resume_gives_identical_weights(sd15, tmp_path):
    project, plan = sd15
    # 10 steps straight against 5 steps, a new process's worth of state from the checkpoint, 5 more.
    straight = run(params_for("tiny-sd15", max_train_steps=10), train_paths(project, plan, tmp_path / "a"))
    first = run(params_for("tiny-sd15", max_train_steps=5, save_every_n_steps=5), train_paths(project, plan, tmp_path / "b"))
    assert first.global_step == 5
    resumed = run(params_for("tiny-sd15", max_train_steps=10), train_paths(project, plan, tmp_path / "b"), resume="latest")
    assert resumed.global_step == 10
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.losses == straight.losses[5:]


def test_ema_is_saved_in_checkpoints_and_resumes_exactly(sd15, tmp_path):
    project, plan = sd15
    settings = {"ema_decay_rate": 0.9, "ema_update_interval": 1, "learning_rate": 1e-3}
    straight = run(params_for("tiny-sd15", max_train_steps=4, **settings), train_paths(project, plan, tmp_path / "a"))
    run(params_for("tiny-sd15", max_train_steps=2, save_every_n_steps=2, **settings), train_paths(project, plan, tmp_path / "b"))
    assert (tmp_path / "b" / "kiln" / "checkpoints" / "step-00000002" / "ema.safetensors").is_file()
    run(params_for("tiny-sd15", max_train_steps=4, **settings), train_paths(project, plan, tmp_path / "b"), resume="latest")
    a = load_file(str(tmp_path / "a" / "kiln" / "kiln_ema.safetensors"))
    b = load_file(str(tmp_path / "b" / "kiln" / "kiln_ema.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert straight.output.is_file()
