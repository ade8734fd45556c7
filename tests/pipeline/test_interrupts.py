"""Ctrl-C and SIGTERM: the stop request, and a trainer that saves a checkpoint and resumes from it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoints
from pipeline.interrupts import stop_on_signals
from pipeline.train import Interrupted, run
from tests.conftest import params_for, sigterm_during_step, train_paths

ROOT = Path(__file__).resolve().parents[2]


def test_signals_only_set_the_request_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill() returns
        assert stop.signal == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt inside the block
        assert stop.signal == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ValueError), stop_on_signals():
        raise ValueError("the handlers are restored however the block ends")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_says_at_once_that_training_stops_after_this_step(capfd):
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert capfd.readouterr().err == "\nSIGINT: stopping after this step...\n"
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C asks for the same stop
        assert capfd.readouterr().err == "\nSIGINT: already stopping after this step...\n"


def test_a_stop_saves_a_checkpoint_that_resumes_exactly(sd15, tmp_path):
    # In-process: a SIGTERM arrives during step 3 (the optimizer stepping); the step finishes, a checkpoint
    # is saved, and the resumed run ends with the weights of a run that was never stopped.

    project, plan = sd15
    straight = run(params_for("tiny-sd15", max_train_steps=5), train_paths(project, plan, tmp_path / "a"))
    expected = r"SIGTERM: stopped at step 3; saved .*interrupted\. Continue with `kiln train` or `dvc repro`"
    with sigterm_during_step(3), pytest.raises(Interrupted, match=expected):
        run(params_for("tiny-sd15", max_train_steps=5), train_paths(project, plan, tmp_path / "b"))
    saved = checkpoints(tmp_path / "b" / "kiln" / "checkpoints")
    assert [path.name for path in saved] == ["interrupted"]
    assert json.loads((saved[0] / "state.json").read_text())["global_step"] == 3
    resumed = run(params_for("tiny-sd15", max_train_steps=5), train_paths(project, plan, tmp_path / "b"), resume="latest")
    assert resumed.losses == straight.losses  # the first 3 from the checkpoint's history
    assert checkpoints(tmp_path / "b" / "kiln" / "checkpoints") == []  # the finished run superseded it
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_signal_during_the_last_step_still_writes_the_outputs(sd15, tmp_path):
    project, plan = sd15
    straight = run(params_for("tiny-sd15", max_train_steps=3), train_paths(project, plan, tmp_path / "a"))
    with sigterm_during_step(3):
        finished = run(params_for("tiny-sd15", max_train_steps=3), train_paths(project, plan, tmp_path / "b"))
    assert finished.global_step == 3 and finished.output.is_file()
    assert checkpoints(tmp_path / "b" / "kiln" / "checkpoints") == []  # a finished run, not an interrupted one
    a, b = load_file(str(straight.output)), load_file(str(finished.output))
    assert all(torch.equal(a[key], b[key]) for key in a)


def read_until(stream, text: str) -> list[str]:
    """Lines of `stream` up to the first that contains `text` (or to its end)."""
    lines = []
    for line in stream:
        lines.append(line)
        if text in line:
            break
    return lines


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(sd15, tmp_path):
    project, plan = sd15
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "model:\n  base: tiny-sd15\ntrain:\n  batch_size: 2\n  workers: 0\n  max_train_steps: 40\n  network_dim: 4\n"
    )
    command = [
        sys.executable, "-m", "stages.train", "--params", str(params_file), "--plan", str(plan),
        "--latents", str(project.paths.store), "--index", str(project.paths.store / "index.parquet"),
        "--models", str(tmp_path / "models"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The trainer logs this line once its handlers are in place; no sleep, however busy the machine.
    ready = read_until(process.stderr, "train: ready")
    assert "train: ready" in ready[-1], "".join(ready)[-2000:]
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=300)
    stderr = "".join(ready) + rest
    assert process.returncode != 0
    assert "Continue with `kiln train` or `dvc repro`" in stderr
    saved = checkpoints(tmp_path / "models" / "kiln" / "checkpoints")
    assert [path.name for path in saved] == ["interrupted"]
    step = json.loads((saved[0] / "state.json").read_text())["global_step"]
    assert 0 < step < 40
    # The same command again (as `dvc repro` runs it) continues this run's checkpoint to the end.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    squeezed = "".join(done.stderr.split())  # the log wraps long lines
    assert "".join(f"resumed from {saved[0]} at step {step}".split()) in squeezed
    assert "train: 40 steps" in done.stdout
    assert os.path.isfile(tmp_path / "models" / "kiln" / "kiln.safetensors")
