"""Checkpoints: exact resume (weights, EMA), the --resume resolver and the seed rule."""


import pytest
import torch
from safetensors.torch import load_file

from pipeline.train import run
from tests.conftest import params_for, train_paths


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


class Optim:
    """Enough of an optimizer / scheduler for save_checkpoint: a state_dict to write and read back."""

    def __init__(self):
        self.state = {"step": torch.tensor(0)}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def saved(root, name, step, seed=42):
    from pipeline.checkpoints import save_checkpoint

    param = torch.nn.Parameter(torch.full((2,), float(step)))
    return save_checkpoint(root, name, [param], Optim(), Optim(), {"global_step": step, "loader": {"seed": seed}}, keep_last=5)


def test_resume_latest_is_the_highest_step_and_a_missing_one_is_a_clear_error(tmp_path):
    from pipeline.checkpoints import resume_source
    from pipeline.errors import KilnError

    root = tmp_path / "checkpoints"
    assert resume_source(root, None) is None
    with pytest.raises(KilnError, match=r"--resume latest: no checkpoint in .*checkpoints"):
        resume_source(root, "latest")
    saved(root, "step-00000002", 2)
    saved(root, "interrupted", 7)
    saved(root, "step-00000005", 5)
    assert resume_source(root, "latest") == root / "interrupted"
    assert resume_source(root, str(root / "step-00000002")) == root / "step-00000002"


def test_seed_rule(tmp_path, caplog):
    import logging

    from pipeline.checkpoints import resolve_seed

    assert resolve_seed(7, None) == 7
    source = saved(tmp_path, "step-00000001", 1, seed=1234)
    assert resolve_seed(-1, source) == 1234  # a resumed run keeps its checkpoint's seed
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoints"):
        drawn = resolve_seed(-1, None)
    assert 0 <= drawn < 2**31 and f"train.seed is -1: using seed {drawn}" in caplog.text


def test_restore_refuses_another_seed(tmp_path):
    from pipeline.checkpoints import Checkpointer
    from pipeline.errors import KilnError

    source = saved(tmp_path, "step-00000003", 3, seed=1)

    class Loader:
        def load_state_dict(self, state):
            self.state = state

    param = torch.nn.Parameter(torch.zeros(2))
    checkpointer = Checkpointer(tmp_path / "run", [param], Optim(), Optim(), Loader(), None, keep_last=2)
    with pytest.raises(KilnError, match=r"saved with train.seed=1, but this run has 2"):
        checkpointer.restore(source, 2)
    assert checkpointer.restore(source, 1) == 3
    assert torch.equal(param.detach(), torch.full((2,), 3.0))
