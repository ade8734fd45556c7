"""Checkpoints: exact resume (weights, EMA), the --resume resolver and the seed rule."""

import errno
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from pipeline.train import run
from tests.conftest import params_for, sigterm_during_step, train_paths


def test_resume_gives_identical_weights(sd15, tmp_path):
    project, plan = sd15
    # 10 steps straight against 5 steps, a new process's worth of state from the checkpoint, 5 more.
    straight = run(params_for("tiny-sd15", max_train_steps=10), train_paths(project, plan, tmp_path / "a"))
    first = run(params_for("tiny-sd15", max_train_steps=5, save_every_n_steps=5), train_paths(project, plan, tmp_path / "b"))
    assert first.global_step == 5
    # max_train_steps differs, so this is another run: continuing from its checkpoint must be asked by name.
    checkpoint = str(tmp_path / "b" / "kiln" / "checkpoints" / "step-00000005")
    resumed = run(params_for("tiny-sd15", max_train_steps=10), train_paths(project, plan, tmp_path / "b"), resume=checkpoint)
    assert resumed.global_step == 10
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The loss history travels in the checkpoint: the resumed run reports all 10 steps.
    assert resumed.losses == straight.losses


def test_ema_is_saved_in_checkpoints_and_resumes_exactly(sd15, tmp_path):
    project, plan = sd15
    settings = {"ema_decay_rate": 0.9, "ema_update_interval": 1, "learning_rate": 1e-3}
    straight = run(params_for("tiny-sd15", max_train_steps=4, **settings), train_paths(project, plan, tmp_path / "a"))
    run(params_for("tiny-sd15", max_train_steps=2, save_every_n_steps=2, **settings), train_paths(project, plan, tmp_path / "b"))
    assert (tmp_path / "b" / "kiln" / "checkpoints" / "step-00000002" / "ema.safetensors").is_file()
    checkpoint = str(tmp_path / "b" / "kiln" / "checkpoints" / "step-00000002")
    run(params_for("tiny-sd15", max_train_steps=4, **settings), train_paths(project, plan, tmp_path / "b"), resume=checkpoint)
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


class Loader:
    def load_state_dict(self, state):
        self.state = state


def identity(**values):
    from pipeline.checkpoints import RunIdentity

    return RunIdentity({"train.learning_rate": 1e-4, "plan": "p", **values})


def saved(root, name, step, seed=42, run=None, keep_last=5):
    from pipeline.checkpoints import save_checkpoint

    run = run or identity()
    param = torch.nn.Parameter(torch.full((2,), float(step)))
    state = {"global_step": step, "loader": {"seed": seed}, "run": {"id": run.id, "values": run.values}}
    return save_checkpoint(root, name, [param], Optim(), Optim(), state, keep_last=keep_last)


def test_resume_takes_this_runs_newest_checkpoint_and_refuses_another_runs(tmp_path, caplog):
    import logging

    from pipeline.checkpoints import resume_source
    from pipeline.errors import KilnError

    root, mine, other = tmp_path / "checkpoints", identity(), identity(**{"train.learning_rate": 5e-4})
    assert resume_source(root, None, mine) is None and resume_source(root, "none", mine) is None
    assert resume_source(root, "auto", mine) is None  # nothing yet: a fresh start
    with pytest.raises(KilnError, match=r"--resume latest: no checkpoint in .*checkpoints"):
        resume_source(root, "latest", mine)
    saved(root, "step-00000002", 2)
    saved(root, "step-00000005", 5)
    saved(root, "step-00000009", 9, run=other)  # a later step, of another run
    assert resume_source(root, "latest", mine) == root / "step-00000005"
    assert resume_source(root, "auto", mine) == root / "step-00000005"
    assert resume_source(root, str(root / "step-00000002"), mine) == root / "step-00000002"
    # Named explicitly, another run's checkpoint is taken (training on from it), with a warning naming what differs.
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        assert resume_source(root, str(root / "step-00000009"), mine) == root / "step-00000009"
    assert "step-00000009 belongs to another run (train.learning_rate: 0.0005 -> 0.0001)" in caplog.text
    # Another run with none of its own: `latest` names what differs; `auto` starts fresh.
    third = identity(plan="q")
    with pytest.raises(KilnError, match=r"belongs to another run \(plan: 'p' -> 'q'"):
        resume_source(root, "latest", third)
    assert resume_source(root, "auto", third) is None


def test_pruning_keeps_other_runs_and_drops_superseded_interrupts(tmp_path):
    from pipeline.checkpoints import checkpoints

    root, other = tmp_path / "checkpoints", identity(**{"train.learning_rate": 5e-4})
    for step in (10, 20, 30):
        saved(root, f"step-{step:08d}", step, run=other, keep_last=1)
    assert [path.name for path in checkpoints(root)] == ["step-00000030"]  # keep_last within a run
    saved(root, "interrupted", 3, keep_last=1)
    saved(root, "step-00000004", 4, keep_last=1)  # supersedes this run's interrupt
    saved(root, "step-00000005", 5, keep_last=1)
    assert [path.name for path in checkpoints(root)] == ["step-00000005", "step-00000030"]


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
    param = torch.nn.Parameter(torch.zeros(2))
    checkpointer = Checkpointer(tmp_path / "run", [param], Optim(), Optim(), Loader(), None, keep_last=2, run=identity())
    with pytest.raises(KilnError, match=r"saved with train.seed=1, but this run has 2"):
        checkpointer.restore(source, 2)
    assert checkpointer.restore(source, 1) == 3
    assert torch.equal(param.detach(), torch.full((2,), 3.0))


def test_runs_do_not_hijack_each_other(sd15, tmp_path):
    # Run A trains to the end; run B (another learning rate) in the same folder is stopped at step 3.
    # B's pruning leaves A's checkpoints; B continues its own interrupt, not A's later step.

    from pipeline.checkpoints import checkpoints
    from pipeline.errors import KilnError
    from pipeline.train import Interrupted

    project, plan = sd15
    paths = train_paths(project, plan, tmp_path)
    run_a = params_for("tiny-sd15", max_train_steps=6, save_every_n_steps=2, save_last_n=2)
    run_b = params_for("tiny-sd15", max_train_steps=6, save_every_n_steps=2, save_last_n=2, learning_rate=5e-4)
    weights_a = load_file(str(run(run_a, paths).output))
    folder = tmp_path / "kiln" / "checkpoints"
    assert [path.name for path in checkpoints(folder)] == ["step-00000004", "step-00000006"]

    with sigterm_during_step(3), pytest.raises(Interrupted):
        run(run_b, paths, resume="auto")  # A's checkpoints are not B's: a fresh start
    assert [path.name for path in checkpoints(folder)] == ["step-00000002", "interrupted", "step-00000004", "step-00000006"]
    b = run(run_b, paths, resume="auto")
    assert len(b.losses) == 6  # steps 4 to 6 trained now, 1 to 3 from B's own interrupt at step 3
    weights_b = load_file(str(b.output))  # the same path as A's: B's weights, not a copy of A's
    assert any(not torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    # B's later saves superseded its interrupt and replaced A's same-named step-4 and step-6.
    assert [path.name for path in checkpoints(folder)] == ["step-00000004", "step-00000006"]
    with pytest.raises(KilnError, match=r"belongs to another run \(.*train\.learning_rate: 0\.0005 -> 0\.001"):
        run(params_for("tiny-sd15", max_train_steps=6, learning_rate=1e-3), paths, resume="latest")
    # Each run has its own TensorBoard folder.
    assert len(list((tmp_path / "kiln" / "logs").glob("run-*"))) == 2


def test_a_resumed_run_reports_the_uninterrupted_runs_metrics_and_loss_curve(sd15, tmp_path):
    from pipeline.train import Interrupted

    project, plan = sd15
    settings = params_for("tiny-sd15", max_train_steps=6, save_every_n_steps=2)
    straight = run(settings, train_paths(project, plan, tmp_path / "a"))
    with sigterm_during_step(4), pytest.raises(Interrupted):
        run(settings, train_paths(project, plan, tmp_path / "b"))
    resumed = run(settings, train_paths(project, plan, tmp_path / "b"))
    assert resumed.losses == straight.losses and len(resumed.losses) == 6
    for name in ("metrics.json", "loss.png"):
        assert (tmp_path / "b/kiln" / name).read_bytes() == (tmp_path / "a/kiln" / name).read_bytes(), name
    # Rerun once finished (what `dvc repro` does when a declared output is missing): the same report again.
    (tmp_path / "b/kiln/loss.png").unlink()
    again = run(settings, train_paths(project, plan, tmp_path / "b"))
    assert again.losses == straight.losses
    for name in ("metrics.json", "loss.png"):
        assert (tmp_path / "b/kiln" / name).read_bytes() == (tmp_path / "a/kiln" / name).read_bytes(), name


def cut_short(path):
    """The file as a copy or a crash that stopped half-way leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        ("weights.safetensors", "SafetensorError: Error while deserializing header: invalid header length"),
        ("optimizer.pt", "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"),
        ("state.json", "JSONDecodeError: Unterminated string starting at: line 7 column 11 (char 77)"),
    ],
)
def test_resume_skips_a_damaged_checkpoint_for_the_newest_valid_one(tmp_path, caplog, file_name, reason):
    from pipeline.checkpoints import resume_source
    from pipeline.errors import KilnError

    root, mine = tmp_path / "checkpoints", identity()
    saved(root, "step-00000002", 2)
    saved(root, "step-00000005", 5)
    damaged = root / "step-00000005" / file_name
    cut_short(damaged)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        assert resume_source(root, "latest", mine) == root / "step-00000002"
        assert resume_source(root, "auto", mine) == root / "step-00000002"
    assert f"{damaged}: damaged ({reason}); " in caplog.text
    # Named explicitly, it is not skipped but refused, in one line naming the file.
    with pytest.raises(KilnError) as error:
        resume_source(root, str(root / "step-00000005"), mine)
    assert str(error.value) == f"{damaged}: damaged ({reason}); delete this checkpoint or resume another"
    # With none valid, the run starts fresh, and says so.
    cut_short(root / "step-00000002" / file_name)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        assert resume_source(root, "latest", mine) is None
    assert caplog.records[-1].getMessage().endswith("can be resumed; starting fresh")


def test_a_checkpoint_whose_state_json_cannot_be_read_is_warned_about_never_pruned(tmp_path, caplog):
    from pipeline.checkpoints import checkpoints

    root = tmp_path / "checkpoints"
    saved(root, "step-00000002", 2, keep_last=1)
    (root / "step-00000002" / "state.json").write_text("")  # a write cut short
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        saved(root, "step-00000004", 4, keep_last=1)  # a fresh run's saves prune: they read every state.json
        saved(root, "step-00000006", 6, keep_last=1)
    # Its run is unknown (it may be another run's), so pruning leaves it to the user; it is reported once.
    assert sorted(path.name for path in root.iterdir()) == ["step-00000002", "step-00000006"]
    assert checkpoints(root) == [root / "step-00000006"]
    assert [record.getMessage() for record in caplog.records] == [
        f"{root / 'step-00000002' / 'state.json'}: damaged (JSONDecodeError: Expecting value: line 1 column 1 (char 0)); "
        "this checkpoint is never resumed or pruned: delete it"
    ]


@pytest.mark.parametrize("file_name", ["optimizer.pt", "scheduler.pt"])
def test_a_pickle_holding_python_objects_is_refused_and_never_run(tmp_path, caplog, file_name):
    from pipeline.checkpoints import Checkpointer, resume_source
    from pipeline.errors import KilnError

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):  # unpickled, this calls open(marker, "w"): an attacker's code would run here
            return (open, (str(marker), "w"))

    root, mine = tmp_path / "checkpoints", identity()
    saved(root, "step-00000002", 2)
    source = saved(root, "step-00000005", 5)
    torch.save({"state": {}, "param_groups": [], "hook": Payload()}, source / file_name)
    refused = f"{source / file_name}: refused: it holds Python objects beyond tensors (io.open)"
    with pytest.raises(KilnError) as error:
        resume_source(root, str(source), mine)
    assert str(error.value) == f"{refused}; delete this checkpoint or resume another"
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        assert resume_source(root, "latest", mine) == root / "step-00000002"
    assert f"{refused}; skipping this checkpoint" in caplog.text
    # Restored anyway, it changes nothing: every file is read before any state is applied.
    param, optimizer = torch.nn.Parameter(torch.zeros(2)), Optim()
    checkpointer = Checkpointer(tmp_path / "run", [param], optimizer, Optim(), Loader(), None, keep_last=2, run=mine)
    with pytest.raises(KilnError) as error:
        checkpointer.restore(source, 42)
    assert str(error.value) == refused
    assert torch.equal(param.detach(), torch.zeros(2)) and optimizer.state == {"step": torch.tensor(0)}
    assert not marker.exists()
    torch.load(source / file_name, weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()


@pytest.mark.parametrize(
    ("writer", "failure"),
    [
        # torch.save on a full disk: the error names no file.
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4544 vs 4432")),
        ("pipeline.checkpoints.save_safetensors", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    ],
)
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, writer, failure):
    from pipeline.checkpoints import Checkpointer
    from pipeline.errors import KilnError

    root = tmp_path / "checkpoints"
    saved(root, "step-00000002", 2)

    def disk_full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(writer, disk_full)
    with pytest.raises(KilnError) as error:
        saved(root, "step-00000005", 5)
    reason = f"{failure.__class__.__name__}: {failure}"
    assert str(error.value) == (
        f"{root / 'step-00000005'}: cannot write this checkpoint ({reason}); free disk space (or check the folder is "
        "writable), then resume: the earlier checkpoints are kept"
    )
    assert sorted(path.name for path in root.iterdir()) == ["step-00000002"]  # no .step-00000005.tmp left
    param = torch.nn.Parameter(torch.zeros(2))
    checkpointer = Checkpointer(tmp_path / "run", [param], Optim(), Optim(), Loader(), None, keep_last=2, run=identity())
    assert checkpointer.restore(root / "step-00000002", 42) == 2
    assert torch.equal(param.detach(), torch.full((2,), 2.0))


def test_the_trainer_resumes_the_newest_checkpoint_that_is_not_damaged(sd15, tmp_path, caplog):
    from pipeline.checkpoints import checkpoints
    from pipeline.train import Interrupted

    project, plan = sd15
    paths = train_paths(project, plan, tmp_path)
    settings = params_for("tiny-sd15", max_train_steps=4, save_every_n_steps=2)
    with sigterm_during_step(3), pytest.raises(Interrupted):
        run(settings, paths)
    folder = tmp_path / "kiln" / "checkpoints"
    assert [path.name for path in checkpoints(folder)] == ["step-00000002", "interrupted"]
    cut_short(folder / "interrupted" / "weights.safetensors")
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoints"):
        resumed = run(settings, paths, resume="latest")
    assert f"{folder / 'interrupted' / 'weights.safetensors'}: damaged (" in caplog.text
    assert f"resumed from {folder / 'step-00000002'} at step 2" in caplog.text
    assert resumed.global_step == 4 and len(resumed.losses) == 4  # 2 from step-00000002, 2 trained now


def test_save_every_n_minutes_saves_by_the_clock(sd15, tmp_path, monkeypatch):
    import pipeline.train as train
    from pipeline.checkpoints import checkpoints

    project, plan = sd15
    import itertools
    import time
    from types import SimpleNamespace

    clock = itertools.count(0, 50)  # seconds: each reading 50 s after the last; the run starts at 0
    monkeypatch.setattr(train, "time", SimpleNamespace(monotonic=lambda: next(clock), time=time.time))
    # EveryDream2's name; 2 minutes: a save when 120 s have passed since the start or the last save.
    settings = params_for("tiny-sd15", max_train_steps=6, save_last_n=10, ckpt_every_n_minutes=2)
    assert settings.train.save_every_n_minutes == 2
    run(settings, train_paths(project, plan, tmp_path))
    saved = [path.name for path in checkpoints(tmp_path / "kiln" / "checkpoints")]
    # Readings: start 0; steps 1-6 read 50, 100, 150 (save; reset at 200), 250, 300, 350 (save; reset 400).
    assert saved == ["step-00000003", "step-00000006"]
