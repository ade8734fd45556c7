"""What a run writes: the LoRA and full-model files, their EMA twins, the diffusers LoRA, the metadata."""


import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.train import run
from tests.conftest import params_for, train_paths, unet_output


def test_diffusers_format_lora_loads_and_matches_the_kohya_file(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipeline.presets import preset_dir


    project, plan = sd15
    result = run(params_for("tiny-sd15", max_train_steps=2, save_diffusers_lora=True, learning_rate=1e-2), train_paths(project, plan, tmp_path))
    folder = tmp_path / "kiln" / "diffusers_lora"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    outputs = []
    for source in (str(folder), str(result.output)):
        pipeline = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
        base = unet_output(pipeline)
        pipeline.load_lora_weights(source)
        outputs.append(unet_output(pipeline))
        assert not torch.allclose(base, outputs[-1])
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-2, rtol=2e-2)  # the kohya file is fp16


def test_full_fine_tune_up_blocks_only(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipeline.presets import preset_dir

    project, plan = sd15
    result = run(
        params_for("tiny-sd15", mode="full", up_blocks_only=True, max_train_steps=2, learning_rate=1e-3, save_precision="float"),
        train_paths(project, plan, tmp_path),
    )
    assert result.output == tmp_path / "kiln" / "kiln.safetensors"
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "kiln" / "diffusers", safety_checker=None)  # a complete folder
    base = UNet2DConditionModel.from_pretrained(preset_dir("tiny-sd15"), subfolder="unet")
    trained, original = pipeline.unet.state_dict(), base.state_dict()
    changed = {name for name in original if not torch.equal(trained[name], original[name])}
    assert changed and all(name.startswith("up_blocks.") for name in changed)
    # The single file carries the same trained weights under the original names, which diffusers reads back.
    single = StableDiffusionPipeline.from_single_file(str(result.output), config=str(preset_dir("tiny-sd15")))
    assert all(torch.equal(value, trained[name]) for name, value in single.unet.state_dict().items())
    with safe_open(str(result.output), "pt") as handle:
        assert "model.diffusion_model.output_blocks.0.0.in_layers.0.weight" in handle.keys()
        assert handle.metadata()["ss_steps"] == "2" and "ss_network_dim" not in handle.metadata()


def test_ema_of_a_full_fine_tune_is_saved_as_its_own_single_file(sd15, tmp_path):
    project, plan = sd15
    settings = {"mode": "full", "up_blocks_only": True, "max_train_steps": 2, "learning_rate": 1e-2,
                "ema_decay_rate": 0.5, "ema_update_interval": 1, "save_precision": "float"}
    result = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path))
    trained, ema = load_file(str(result.output)), load_file(str(tmp_path / "kiln" / "kiln_ema.safetensors"))
    assert trained.keys() == ema.keys()
    differs = {key for key in trained if not torch.equal(trained[key], ema[key])}
    assert differs and all(key.startswith("model.diffusion_model.output_blocks.") for key in differs)


def test_base_model_version_in_the_metadata():
    from pipeline.saving import RunSummary, training_metadata

    settings = params_for("tiny-sd15")
    versions = {v: training_metadata(settings, RunSummary(v), 1, 1, "0" * 64) for v in ("sd1", "sd2", "sdxl")}
    assert [versions[v]["ss_base_model_version"] for v in ("sd1", "sd2", "sdxl")] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert versions["sd2"]["ss_v2"] == "True" and versions["sd1"]["ss_v2"] == "False"


def test_the_metadata_records_only_the_settings_that_acted():
    from pipeline.saving import RunSummary, training_metadata

    plain = training_metadata(params_for("tiny-sd15"), RunSummary(), 1, 1, "0" * 64)
    assert plain["ss_loss_type"] == "mse" and plain["ss_min_snr_gamma"] == "None"
    assert plain["ss_huber_c"] == "0.1" and plain["ss_multires_noise_discount"] == "0.3"  # kohya writes its keys always
    assert not [key for key in plain if key.startswith(("ss_fourier_", "ss_ema_", "ss_reflow_"))]
    flow = params_for("tiny-sd15", rectified_flow=True, reflow_steps=2, min_timestep=100, ema_decay_rate=0.99)
    written = training_metadata(flow, RunSummary(prediction_type="v_prediction"), 1, 1, "0" * 64)
    assert written["ss_reflow_steps"] == "2" and written["ss_min_timestep"] == "100" and written["ss_ema_decay_rate"] == "0.99"
    for key in ("min_snr_gamma", "zero_terminal_snr", "use_log_norm_timesteps", "debiased_estimation_loss", "loss_type"):
        assert f"ss_{key}" not in written, key
    assert "ss_debiased_estimation" not in written


def test_identical_runs_write_identical_files(sd15, tmp_path):
    # DVC's "only changed steps rerun" needs the same bytes for the same inputs: the LoRA, its EMA twin.
    import hashlib

    project, plan = sd15
    settings = params_for("tiny-sd15", max_train_steps=2, ema_decay_rate=0.9, ema_update_interval=1)
    digests = []
    for name in ("a", "b"):
        run(settings, train_paths(project, plan, tmp_path / name))
        folder = tmp_path / name / "kiln"
        digests.append([hashlib.sha256((folder / file).read_bytes()).hexdigest() for file in ("kiln.safetensors", "kiln_ema.safetensors")])
    assert digests[0] == digests[1]
