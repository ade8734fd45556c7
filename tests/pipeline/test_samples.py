"""Samples drawn during training: the grid files, the trained and EMA weights, each sampler's scheduler,
the labels, prompt files, and a quiet console."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import pipeline.samples as samples
from pipeline.errors import KilnError
from pipeline.params import SAMPLERS, SamplePrompt
from pipeline.prompts import FilePrompt
from pipeline.train import run
from tests.conftest import params_for, train_paths


def test_samples_are_drawn_with_the_current_weights(sd15, tmp_path):
    from PIL import Image

    project, plan = sd15
    prompts = [{"prompt": "a sks circle", "seed": 1, "steps": 2, "width": 64, "height": 48}, {"prompt": "a square", "steps": 2, "width": 64, "height": 64}]
    run(params_for("tiny-sd15", max_train_steps=2, sample_prompts=prompts, sample_every_n_steps=1), train_paths(project, plan, tmp_path))
    samples = sorted((tmp_path / "kiln" / "samples").glob("*.png"))
    assert [path.name for path in samples] == ["step-00000001.png", "step-00000002.png"]
    with Image.open(samples[0]) as grid:
        assert grid.width == 128 and grid.height > 64  # two images side by side, 64x48 and 64x64, labelled below


def test_ema_samples_are_drawn_with_each_model_asked_for(sd15, tmp_path):
    project, plan = sd15
    prompt = {"prompt": "sks circle", "seed": 1, "steps": 2, "width": 64, "height": 64}
    settings = {"ema_decay_rate": 0.5, "ema_update_interval": 1, "sample_prompts": [prompt], "sample_every_n_steps": 2,
                "max_train_steps": 2, "ema_sample_nonema_model": True, "learning_rate": 1e-2}
    run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path))
    samples = tmp_path / "kiln" / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step-00000002-ema.png", "step-00000002.png"]
    assert (samples / "step-00000002-ema.png").read_bytes() != (samples / "step-00000002.png").read_bytes()


def test_the_vae_is_loaded_only_when_something_needs_it(sd15, tmp_path, monkeypatch):
    import pipeline.samples as samples

    loads = []
    real_find_vae = samples.find_vae

    def counting_find_vae(*args, **kwargs):
        loads.append(args)
        return real_find_vae(*args, **kwargs)

    monkeypatch.setattr(samples, "find_vae", counting_find_vae)
    project, plan = sd15
    run(params_for("tiny-sd15", max_train_steps=2), train_paths(project, plan, tmp_path / "lora"))
    assert loads == []  # a LoRA run that draws no samples never reads the VAE
    prompt = {"prompt": "sks circle", "seed": 1, "steps": 1, "width": 32, "height": 32}
    run(params_for("tiny-sd15", max_train_steps=2, sample_prompts=[prompt], sample_every_n_steps=1), train_paths(project, plan, tmp_path / "s"))
    assert loads == [("tiny-sd15", "model.base", None)]  # once, for both sample grids


# --- the sampler, the grid and the console, on the tiny model without training --------------------------


@pytest.fixture(scope="module")
def tiny():
    from pipeline.models import find_vae
    from pipeline.sd import load_components

    return load_components("tiny-sd15"), find_vae("tiny-sd15", "model.base").load().vae


EXPECTED_SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler", "dpmsingle": "DPMSolverSinglestepScheduler",
}


def test_every_sampler_name_has_its_kohya_scheduler():
    assert set(EXPECTED_SCHEDULERS) == set(SAMPLERS) == set(samples.SCHEDULERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2's, from inside diffusers' K-DPM schedulers
@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates algorithm_type dpmsolver
def test_each_sampler_draws_with_kohyas_scheduler(tiny, sampler, monkeypatch):
    import importlib.util

    components, vae = tiny
    made = []
    real_make = samples.make_scheduler
    monkeypatch.setattr(samples, "make_scheduler", lambda *args: made.append(real_make(*args)) or made[-1])
    prompt = SamplePrompt(prompt="a sks circle", seed=1, steps=4, width=32, height=32)
    if sampler == "lms" and importlib.util.find_spec("scipy") is None:
        with pytest.raises(KilnError) as caught:
            samples.render(components, components.unet, vae, [prompt], "cpu", sampler=sampler)
        assert str(caught.value) == (
            "samples: the lms sampler (LMSDiscreteScheduler) needs scipy, which is not installed; pip install scipy, or choose another sampler"
        )
        return
    images = samples.render(components, components.unet, vae, [prompt], "cpu", sampler=sampler)
    assert [type(scheduler).__name__ for scheduler in made] == [EXPECTED_SCHEDULERS[sampler]]
    if sampler.startswith("dpmsolver"):
        assert made[0].config.algorithm_type == sampler
    assert images[0].size == (32, 32) and np.isfinite(np.asarray(images[0], dtype=np.float32)).all()


def test_a_prompt_files_sampler_overrides_train_sample_sampler(tiny, monkeypatch):
    components, vae = tiny
    made = []
    real_make = samples.make_scheduler
    monkeypatch.setattr(samples, "make_scheduler", lambda *args: made.append(real_make(*args)) or made[-1])
    prompts = [FilePrompt(prompt="a", steps=1, width=32, height=32, sampler="ddim"), FilePrompt(prompt="b", steps=1, width=32, height=32)]
    samples.render(components, components.unet, vae, prompts, "cpu", sampler="euler_a")
    assert [type(scheduler).__name__ for scheduler in made] == ["EulerAncestralDiscreteScheduler", "DDIMScheduler"]


def test_zero_terminal_snr_rescales_where_the_scheduler_can(tiny, caplog):
    components, _ = tiny
    config = components.noise_scheduler.config  # tiny-sd15 predicts epsilon
    euler = samples.make_scheduler("euler", config, True)
    assert euler.config.rescale_betas_zero_snr and euler.config.timestep_spacing == "trailing"
    ddim = samples.make_scheduler("ddim", config, True)  # alphas_cumprod 0 at the first step: only v-prediction survives it
    assert not ddim.config.rescale_betas_zero_snr
    v_ddim = samples.make_scheduler("ddim", {**config, "prediction_type": "v_prediction"}, True)
    assert v_ddim.config.rescale_betas_zero_snr and v_ddim.config.timestep_spacing == "trailing"
    prompt = {"prompt": "a", "steps": 1, "width": 32, "height": 32}
    params = params_for("tiny-sd15", zero_terminal_snr=True, sample_sampler="ddim", sample_prompts=[prompt])
    with caplog.at_level("WARNING", logger="pipeline.samples"):
        samples.Sampler(components, params, Path("unused"), "cpu", None, True, False)
    assert caplog.messages == [
        "samples: the ddim sampler cannot draw from the zero-terminal-SNR schedule (train.zero_terminal_snr) of a epsilon model; "
        "it draws on the base's schedule, as kohya's does (euler, euler_a, dpmsolver, dpmsolver++ can)"
    ]


def test_a_step_count_the_sampler_cannot_run_fails_before_training(tiny):
    components, _ = tiny
    params = params_for("tiny-sd15", sample_sampler="pndm", sample_prompts=[{"prompt": "a", "steps": 2}])
    with pytest.raises(KilnError) as caught:
        samples.Sampler(components, params, Path("unused"), "cpu", None, True, False)
    assert str(caught.value) == "samples: the pndm sampler cannot draw in 2 steps; give the prompt more steps, or choose another sampler"


def labelled(tmp_path, name, global_step=4):
    prompts = [SamplePrompt(prompt="a sks circle on a table", seed=1, width=64, height=48), SamplePrompt(prompt="a square", seed=2, cfg=4.5, width=96, height=64)]
    images = [Image.new("RGB", (prompt.width, prompt.height), colour) for prompt, colour in zip(prompts, ["red", "blue"], strict=True)]
    return samples.save_grid(images, prompts, global_step, tmp_path / name)


def test_the_grid_labels_each_image_in_a_strip_below_it(tmp_path):
    grid = labelled(tmp_path, "grid.png")
    assert grid.width == 64 + 96 and grid.height > 64
    assert grid.getpixel((10, 10)) == (255, 0, 0) and grid.getpixel((70, 10)) == (0, 0, 255)
    for left, right in ((0, 62), (64, 158)):
        strip = grid.crop((left, 64, right, grid.height))
        assert len(strip.getcolors()) > 1  # text on the strip, not a blank band
    assert samples.label_lines(SamplePrompt(prompt="a square", seed=2, cfg=4.5), 4, 500, *draw_and_font()) == ["a square", "seed 2  cfg 4.5  step 4"]
    clipped = samples.label_lines(SamplePrompt(prompt="a sks circle on a table", seed=1), 4, 58, *draw_and_font())
    assert clipped[0].endswith("...") and clipped[1:] and all(ImageDraw.Draw(grid).textlength(line, font=ImageFont.load_default()) <= 58 for line in clipped)


def draw_and_font():
    return ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()


def test_the_same_inputs_give_the_same_png_bytes(tmp_path):
    labelled(tmp_path, "a.png")
    labelled(tmp_path, "b.png")
    labelled(tmp_path, "c.png", global_step=8)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()  # the step is in the label


DRAW = """
from pipeline.models import find_vae
from pipeline.params import SamplePrompt
from pipeline.samples import render
from pipeline.sd import load_components

components = load_components("tiny-sd15")
vae = find_vae("tiny-sd15", "model.base").load().vae
render(components, components.unet, vae, [SamplePrompt(prompt="a", steps=1, width=32, height=32)], "cpu")
print("drawn")
"""


def test_drawing_prints_no_torchvision_warning():
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has nothing to warn about")
    # A fresh interpreter: transformers warns once per process, and only on the first import of the pipelines.
    plain = subprocess.run([sys.executable, "-c", "from diffusers import StableDiffusionPipeline"], capture_output=True, text=True, check=True)
    assert "requires torchvision" in plain.stderr  # what the draw used to print in the progress bar
    drawn = subprocess.run([sys.executable, "-c", DRAW], capture_output=True, text=True, check=True)
    assert drawn.stdout.strip() == "drawn" and "requires torchvision" not in drawn.stderr


def test_the_sampler_reads_a_prompt_file_and_its_cadence(tiny, tmp_path):
    components, _ = tiny
    (tmp_path / "sample_prompts.json").write_text('{"generate_samples_every_n_steps": 50, "samples": [{"prompt": "a", "seed": 3}]}')
    params = params_for("tiny-sd15", sample_prompts="sample_prompts.json")
    sampler = samples.Sampler(components, params, tmp_path / "samples", "cpu", None, True, False, root=tmp_path)
    assert sampler.prompts == [FilePrompt(prompt="a", seed=3)] and sampler.enabled
    assert (sampler.every_n_steps, sampler.every_n_epochs) == (50, None)
    samples.check_sample_prompts(params.train, tmp_path)
    clash = params_for("tiny-sd15", sample_prompts="sample_prompts.json", sample_every_n_steps=10)
    with pytest.raises(KilnError) as caught:
        samples.check_sample_prompts(clash.train, tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}/sample_prompts.json: generate_samples_every_n_steps is 50, but train.sample_every_n_steps is 10; keep one of them"
    )
    with pytest.raises(KilnError) as caught:
        samples.check_sample_prompts(params_for("tiny-sd15", sample_prompts="missing.txt").train, tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}/missing.txt: sample prompt file not found")


def test_clip_skip_draws_with_the_embeddings_training_uses(tiny):
    # The prompts go through pipeline.sd.encode_text, as captions do in training; diffusers' own clip_skip
    # path reaches for CLIPTextModel.text_model, which transformers 5 no longer has.
    from pipeline.samples import render

    components, vae = tiny
    prompt = [SamplePrompt(prompt="a sks circle", seed=1, steps=2, width=64, height=64)]
    last = render(components, components.unet, vae, prompt, "cpu", clip_skip=1)[0]
    penultimate = render(components, components.unet, vae, prompt, "cpu", clip_skip=2)[0]
    assert last.size == penultimate.size == (64, 64)
    assert last.tobytes() != penultimate.tobytes()
