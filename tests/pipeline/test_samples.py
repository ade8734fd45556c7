"""Samples drawn during training: the grid files, the trained and EMA weights."""


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
        assert grid.size == (128, 64)  # two images side by side, 64x48 and 64x64


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
