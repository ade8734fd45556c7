"""The trainer end to end on the demo set at resolution 256 with the tiny presets, on the CPU: the run's
shape (LoRA, SDXL, full, single-file bases), the golden loss curve, every technique, rectified flow."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoints
from pipeline.errors import KilnError
from pipeline.params import validate_params
from pipeline.train import TrainPaths, run
from tests.conftest import params_for, prepared, train_paths, with_model

ROOT = Path(__file__).resolve().parents[2]


def test_lora_smoke_keys_metadata_and_loss(sd15, tmp_path):
    project, plan = sd15
    result = run(params_for("tiny-sd15", network_train_text_encoder=True, log_step=1), train_paths(project, plan, tmp_path))
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    state = load_file(str(result.output))
    assert any(key.startswith("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q") for key in state)
    assert any(key.startswith("lora_te_text_model_encoder_layers_1_self_attn_v_proj") for key in state)
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    # Images x repeats, as kohya counts them (the plan's 14 train and 8 reg images; test_saving has every key).
    assert metadata["ss_steps"] == "4" and metadata["ss_num_train_images"] == "113" and metadata["ss_num_reg_images"] == "113"
    assert json.loads(metadata["ss_tag_frequency"])["10_sks circle"]["sks circle"] == 2  # from the final captions
    assert len(metadata["kiln_params_sha256"]) == 64
    metrics = json.loads((tmp_path / "kiln" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == pytest.approx(result.losses[-1])
    # dvclive plots (loss, lr per step) and TensorBoard events, as dvc.yaml declares them.
    loss_plot = (tmp_path / "kiln" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert loss_plot[0] == "step\tloss" and len(loss_plot) == 5
    assert float(loss_plot[-1].split("\t")[1]) == pytest.approx(result.losses[-1])
    assert list((tmp_path / "kiln" / "logs").glob("run-*/events.out.tfevents.*"))  # one folder per run


def test_golden_loss_curve(sd15, tmp_path):
    project, plan = sd15
    result = run(params_for("tiny-sd15", max_train_steps=5, learning_rate=1e-3), train_paths(project, plan, tmp_path))
    # Recorded from this code on torch 2.13 CPU; a change here means the objective, the loader's
    # draws or the optimizer changed.
    golden = [1.17939, 1.14840, 1.08259, 1.14539, 1.14243]
    assert result.losses == pytest.approx(golden, abs=5e-3), result.losses


@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl"])
def test_cached_text_encoder_outputs_train_as_encoding_every_step_does(base, sd15, demo_source, tmp_path):
    # Caption dropout (the empty caption) and embedding perturbation (drawn after the cache, from the
    # batch's generator) both act.
    project, plan = sd15 if base == "tiny-sd15" else prepared(tmp_path / "xl", demo_source, base)
    settings = {"max_train_steps": 4, "learning_rate": 1e-3, "cond_dropout": 0.3, "embedding_perturbation": 0.1}
    plain = run(params_for(base, **settings), train_paths(project, plan, tmp_path / "a"))
    cached = run(params_for(base, **settings, cache_text_encoder_outputs=True), train_paths(project, plan, tmp_path / "b"))
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    # A caption encoded in another batch may round its last float bit otherwise; the saved fp16 weights
    # then differ by at most about one fp16 step.
    a, b = load_file(str(plain.output)), load_file(str(cached.output))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-4)


def test_a_loras_frozen_base_is_kept_in_the_compute_dtype(sd15, tmp_path, monkeypatch, fresh_accelerate_state):
    import pipeline.train as train

    seen = {}
    real_cast = train.cast_frozen

    def recording(modules, dtype):
        cast = real_cast(modules, dtype)
        seen["unet"] = {param.dtype for name, param in modules[0].named_parameters() if "lora_" not in name}
        seen["lora"] = {param.dtype for name, param in modules[0].named_parameters() if "lora_" in name}
        seen["text_encoder"] = {param.dtype for param in modules[1].parameters()}
        return cast

    monkeypatch.setattr(train, "cast_frozen", recording)
    project, plan = sd15
    prompts = [{"prompt": "a sks circle", "seed": 1, "steps": 2, "width": 64, "height": 64}]
    settings = {"max_train_steps": 3, "learning_rate": 1e-3, "sample_prompts": prompts, "sample_every_n_steps": 3}
    from accelerate.state import AcceleratorState

    plain = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path / "a"))
    assert seen == {}  # float32 training casts nothing
    AcceleratorState._reset_state(reset_partial_state=True)  # another mixed precision: a fresh state
    mixed = run(params_for("tiny-sd15", **settings, mixed_precision="bf16"), train_paths(project, plan, tmp_path / "b"))
    assert seen == {"unet": {torch.bfloat16}, "lora": {torch.float32}, "text_encoder": {torch.bfloat16}}
    # bf16 rounds the forward pass; the losses agree to bf16's precision, and the samples are drawn.
    assert mixed.losses == pytest.approx(plain.losses, rel=2e-2)
    assert (tmp_path / "b/kiln/samples/step-00000003.png").is_file()
    assert train.frozen_weight_dtype(params_for("tiny-sd15", mode="full", mixed_precision="bf16").train) is None
    assert train.frozen_weight_dtype(params_for("tiny-sd15", mixed_precision="fp16").train) == torch.float16


def test_cached_text_encoder_outputs_resume_exactly(sd15, tmp_path):
    from pipeline.train import Interrupted
    from tests.conftest import sigterm_during_step

    project, plan = sd15
    settings = params_for("tiny-sd15", max_train_steps=6, learning_rate=1e-3, cond_dropout=0.3, cache_text_encoder_outputs=True)
    straight = run(settings, train_paths(project, plan, tmp_path / "a"))
    with sigterm_during_step(3), pytest.raises(Interrupted):
        run(settings, train_paths(project, plan, tmp_path / "b"))
    resumed = run(settings, train_paths(project, plan, tmp_path / "b"))
    assert resumed.losses == straight.losses
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_tf32_follows_allow_tf32():
    import pipeline.train as train

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        train.set_tf32(True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        train.set_tf32(False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.slow
def test_a_compiled_unet_trains_as_the_eager_one(sd15, tmp_path):
    # torch.compile on the CPU (inductor and the C compiler): the same losses to float rounding.
    project, plan = sd15
    settings = {"max_train_steps": 3, "learning_rate": 1e-3}
    eager = run(params_for("tiny-sd15", **settings), train_paths(project, plan, tmp_path / "a"))
    compiled = run(params_for("tiny-sd15", **settings, compile_unet=True), train_paths(project, plan, tmp_path / "b"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    # nn.Module.compile keeps the modules: the LoRA's keys are the eager run's.
    assert load_file(str(compiled.output)).keys() == load_file(str(eager.output)).keys()


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl"])
def test_one_gpu_step_with_and_without_the_fast_paths(base, sd15, demo_source, tmp_path, fresh_accelerate_state):
    # bf16 mixed precision on the GPU; the fast paths (cached text embeddings with the encoders moved off
    # the GPU, a compiled UNet, the frozen base in bf16) change the first step's loss only within bf16's
    # precision, and samples are still drawn (their prompts encoded on the CPU).
    project, plan = sd15 if base == "tiny-sd15" else prepared(tmp_path / "xl", demo_source, base)
    prompts = [{"prompt": "a sks circle", "seed": 1, "steps": 2, "width": 64, "height": 64}]
    settings = {"max_train_steps": 1, "mixed_precision": "bf16", "sample_prompts": prompts, "sample_every_n_steps": 1}
    plain = run(params_for(base, **settings, allow_tf32=False), train_paths(project, plan, tmp_path / "a"))
    fast = run(params_for(base, **settings, cache_text_encoder_outputs=True, compile_unet=True), train_paths(project, plan, tmp_path / "b"))
    assert fast.losses == pytest.approx(plain.losses, rel=2e-2)
    assert (tmp_path / "b/kiln/samples/step-00000001.png").is_file()


def test_sdxl_lora_smoke(demo_source, tmp_path):
    project, plan = prepared(tmp_path, demo_source, "tiny-sdxl")
    result = run(params_for("tiny-sdxl", max_train_steps=2, network_train_text_encoder=True, conv_dim=2), train_paths(project, plan, tmp_path / "m"))
    state = load_file(str(result.output))
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in state  # LoCon: down_blocks.0.resnets.0.conv1, kohya's SDXL name
    assert any(key.startswith("lora_te1_") for key in state) and any(key.startswith("lora_te2_") for key in state)
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}  # the effective alpha
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_log_timesteps_and_random_seed(sd15, tmp_path):
    from pipeline.tables import read_table

    project, plan = sd15
    result = run(
        params_for("tiny-sd15", max_train_steps=2, log_timesteps=True, seed=-1, min_timestep=100, max_timestep=200),
        train_paths(project, plan, tmp_path),
    )
    rows = read_table(tmp_path / "kiln" / "logs" / "timesteps.parquet")
    assert len(rows) == 4 and {row["global_step"] for row in rows} == {0, 1}
    assert all(100 <= row["timestep"] < 200 for row in rows)
    with safe_open(str(result.output), "pt") as handle:
        seed = int(handle.metadata()["ss_seed"])
    assert 0 <= seed < 2**31  # the drawn seed, not -1


def test_load_settings_every_epoch_applies_only_reloadable_keys(tmp_path, caplog):
    import logging

    from pipeline.train import reload_settings

    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  save_every_n_epochs: 2\n  learning_rate: 1.0e-4\n")
    current = validate_params({"train": {"save_every_n_epochs": 1, "learning_rate": 1e-4}}).train
    with caplog.at_level(logging.INFO):
        updated = reload_settings(current, params_file, ())
    assert updated.save_every_n_epochs == 2
    params_file.write_text("train:\n  save_every_n_epochs: 2\n  learning_rate: 5.0e-4\n")
    with caplog.at_level(logging.WARNING):
        again = reload_settings(updated, params_file, ())
    assert again.learning_rate == 1e-4
    assert "train.learning_rate changed" in caplog.text and "cannot change mid-run; ignored" in caplog.text
    # EveryDream2's reloadable technique keys, under their EveryDream2 names.
    params_file.write_text("train:\n  save_every_n_epochs: 2\n  zero_frequency_noise_ratio: 0.1\n  min_snr_gamma: 5\n  clip_skip: 2\n")
    techniques = reload_settings(again, params_file, ())
    assert (techniques.noise_offset, techniques.min_snr_gamma, techniques.clip_skip) == (0.1, 5.0, 2)


@pytest.mark.slow
def test_two_process_accelerate_launch(sd15, tmp_path):
    project, plan = sd15
    params_file = tmp_path / "params.yaml"
    params_file.write_text("model:\n  base: tiny-sd15\ntrain:\n  batch_size: 2\n  workers: 0\n  max_train_steps: 2\n  network_dim: 4\n")
    done = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.train", "--params", str(params_file),
            "--plan", str(plan), "--latents", str(project.paths.store), "--index", str(project.paths.store / "index.parquet"),
            "--models", str(tmp_path / "models"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 2 steps" in done.stdout
    state = load_file(str(tmp_path / "models" / "kiln" / "kiln.safetensors"))
    assert any(key.endswith(".lora_up.weight") for key in state)


def test_a_plan_with_no_batches_is_a_clear_error(sd15, tmp_path):
    from pipeline.errors import KilnError

    project, plan = sd15
    with pytest.raises(KilnError, match="an epoch has no batches .* lower batch_size or use bucket_remainder: fill"):
        run(params_for("tiny-sd15", batch_size=500, bucket_remainder="drop"), train_paths(project, plan, tmp_path))


def test_train_from_a_single_file_base_with_model_config(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipeline.presets import preset_dir
    from pipeline.single_file import save_single_file

    base = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
    checkpoint = save_single_file(tmp_path / "base.safetensors", "sd", base.unet, base.vae, [base.text_encoder], {})
    project, plan = sd15
    settings = validate_params(
        {"model": {"base": str(checkpoint), "config": "tiny-sd15"}, "bucket": {"resolution": 256},
         "train": {"batch_size": 2, "workers": 0, "max_train_steps": 5, "learning_rate": 1e-3, "network_dim": 4, "network_alpha": 2.0}}
    )
    from_file = run(settings, train_paths(project, plan, tmp_path / "file"))
    from_folder = run(params_for("tiny-sd15", max_train_steps=5, learning_rate=1e-3), train_paths(project, plan, tmp_path / "folder"))
    assert from_file.losses == pytest.approx(from_folder.losses, abs=1e-5)  # the same model, read from one file


def test_v_parameterization_overrides_the_scheduler(sd15, tmp_path):
    project, plan = sd15
    settings = params_for("tiny-sd15", max_train_steps=1, mode="full", save_precision="float")
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"v_parameterization": True})})
    run(settings, train_paths(project, plan, tmp_path))
    config = json.loads((tmp_path / "kiln" / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"


EVERY_TECHNIQUE = {
    "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
    "multires_noise_iterations": 4, "multires_noise_discount": 0.3, "ip_noise_gamma": 0.1,
    "ip_noise_gamma_random_strength": True, "zero_terminal_snr": True, "min_timestep": 100, "max_timestep": 900,
    "reg_min_timestep": 500, "reg_max_timestep": 1000, "use_log_norm_timesteps": True, "loss_type": "fourier",
    "fourier_config": "balanced", "fourier_warmup_steps": 5, "min_snr_gamma": 5.0, "debiased_estimation_loss": True,
    "masked_loss": True, "cond_dropout": 0.2, "embedding_perturbation": 0.1, "clip_skip": 2,
    "ema_strength_target": 0.5, "ema_update_interval": 2, "log_timesteps": True, "log_step": 1,
}


def test_every_technique_at_once(sd15, tmp_path):
    from pipeline.saving import technique_fields
    from pipeline.tables import read_table

    project, plan = sd15
    settings = with_model(params_for("tiny-sd15", max_train_steps=20, learning_rate=1e-3, **EVERY_TECHNIQUE), v_parameterization=True)
    result = run(settings, train_paths(project, plan, tmp_path))
    assert result.global_step == 20 and all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    # Every technique's setting that acted is recorded, under kohya's name where kohya has one; the
    # reflow keys did not act (no rectified flow), so they are not.
    for name in technique_fields(settings.train):
        assert f"ss_{name}" in metadata, name
    assert "ss_rectified_flow" in metadata and "ss_reflow_steps" not in metadata
    assert metadata["ss_loss_type"] == "fourier" and metadata["ss_fourier_mode"] == "weighted" and metadata["ss_fourier_weight"] == "0.05"
    assert metadata["ss_noise_offset"] == "0.05" and metadata["ss_multires_noise_iterations"] == "4"
    assert metadata["ss_reg_min_timestep"] == "500" and metadata["ss_min_timestep"] == "100"
    assert metadata["ss_caption_dropout_rate"] == "0.2" and metadata["ss_clip_skip"] == "2"
    assert metadata["ss_v_parameterization"] == "True" and metadata["ss_zero_terminal_snr"] == "True"
    assert float(metadata["ss_ema_decay_rate"]) == pytest.approx(0.5 ** (2 / 20))  # decay^(20 / 2) = 0.5
    # Reg and train samples drew from their own ranges.
    drawn = read_table(tmp_path / "kiln" / "logs" / "timesteps.parquet")
    assert all(500 <= row["timestep"] < 1000 for row in drawn if row["is_reg"])
    assert all(100 <= row["timestep"] < 900 for row in drawn if not row["is_reg"])
    # The Fourier component is logged next to the loss, zero during its warmup.
    fourier = (tmp_path / "kiln" / "plots" / "metrics" / "fourier_component.tsv").read_text().splitlines()
    values = [float(line.split("\t")[1]) for line in fourier[1:]]
    assert values[:4] == [0.0] * 4 and all(value > 0 for value in values[5:])
    # The EMA weights are saved next to the output, and differ from the trained ones.
    ema = load_file(str(tmp_path / "kiln" / "kiln_ema.safetensors"))
    trained = load_file(str(result.output))
    assert ema.keys() == trained.keys() and any(not torch.equal(ema[key], trained[key]) for key in ema)


def test_rectified_flow_needs_a_v_prediction_base(sd15, tmp_path):
    from pipeline.errors import KilnError

    project, plan = sd15
    with pytest.raises(KilnError, match="train.rectified_flow: needs a v-prediction base model, but this one predicts epsilon"):
        run(params_for("tiny-sd15", rectified_flow=True), train_paths(project, plan, tmp_path))


def test_rectified_flow_with_reflow_trains_on_its_own_pairs(sd15, tmp_path, caplog, monkeypatch):
    import logging

    import pipeline.flow as flow
    from pipeline.objective import DiffusionObjective

    generated, seen = [], []
    real_generate, real_loss = flow.generate_reflow_pairs, flow.RectifiedFlowObjective.compute_loss

    def spy_generate(*args, **kwargs):
        generated.extend(real_generate(*args, **kwargs))
        return generated

    def spy_loss(self, model_pred, batch, *args, **kwargs):
        seen.append((batch.noise.detach().clone(), batch.target.detach().clone(), batch.timesteps.detach().clone(), torch.is_grad_enabled()))
        return real_loss(self, model_pred, batch, *args, **kwargs)

    def no_diffusion_loss(*args, **kwargs):
        raise AssertionError("a rectified-flow run computed the DDPM loss")

    monkeypatch.setattr(flow, "generate_reflow_pairs", spy_generate)
    monkeypatch.setattr(flow.RectifiedFlowObjective, "compute_loss", spy_loss)
    monkeypatch.setattr(DiffusionObjective, "compute_loss", no_diffusion_loss)
    project, plan = sd15
    settings = params_for(
        "tiny-sd15", max_train_steps=3, rectified_flow=True, reflow_steps=1, reflow_gen_batches=2, reflow_sample_steps=3,
        learning_rate=1e-3, log_timesteps=True, validation_split=0.3, validate_every=3,
    )
    with caplog.at_level(logging.INFO, logger="pipeline.flow"):
        result = run(with_model(settings, v_parameterization=True), train_paths(project, plan, tmp_path))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "reflow 1/1: 2 pairs of batches" in caplog.text
    # Reflow trained the flow objective on the model's own pairs: x0' as the noise, target x1'' - x0'.
    assert len(generated) == 2
    for (noise, endpoint, _), (used_noise, target, timesteps, _) in zip(generated, seen[:2], strict=True):
        torch.testing.assert_close(used_noise, noise)
        torch.testing.assert_close(target, endpoint - noise)
        assert timesteps.dtype == torch.float32 and ((timesteps >= 0) & (timesteps < 1000)).all()
    # Then 3 main steps on the cached latents, and the validation loss (no gradients) is the flow loss too.
    assert [grad for *_, grad in seen[:5]] == [True] * 5 and seen[5:] and not any(grad for *_, grad in seen[5:])
    assert len(result.validation_losses) == 1 and result.validation_losses[0] > 0
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_rectified_flow"] == "True" and metadata["ss_reflow_steps"] == "1"
    # The diffusion-only keys did not act, so they are not recorded; the ranges did, so they are.
    assert "ss_min_snr_gamma" not in metadata and "ss_zero_terminal_snr" not in metadata
    assert metadata["ss_min_timestep"] == "0" and metadata["ss_max_timestep"] == "1000"




def poisoned_losses(monkeypatch, bad_calls: set[int]) -> None:
    """TrainingStep.loss returns a NaN loss on the given (0-based) calls, as an overflow would."""
    import dataclasses

    from pipeline.step import TrainingStep

    real_loss, calls = TrainingStep.loss, iter(range(10**6))

    def loss(self, *args, **kwargs):
        output = real_loss(self, *args, **kwargs)
        return dataclasses.replace(output, loss=output.loss * float("nan")) if next(calls) in bad_calls else output

    monkeypatch.setattr(TrainingStep, "loss", loss)


def test_a_nan_loss_skips_its_step_and_changes_no_weight(sd15, tmp_path, monkeypatch, caplog):
    project, plan = sd15
    poisoned_losses(monkeypatch, {1})
    result = run(params_for("tiny-sd15", max_train_steps=4), train_paths(project, plan, tmp_path))
    assert result.nonfinite_steps == 1 and result.global_step == 4 and len(result.losses) == 4
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(torch.isfinite(tensor).all() for tensor in load_file(str(result.output)).values())
    assert "NaN or inf loss or gradients after step 1; that step was skipped (1 in a row)" in caplog.text


def test_nan_losses_in_a_row_stop_with_a_clear_error(sd15, tmp_path, monkeypatch):
    project, plan = sd15
    poisoned_losses(monkeypatch, set(range(2, 100)))
    settings = params_for("tiny-sd15", max_train_steps=6, save_every_n_steps=1, max_nonfinite_steps=3)
    expected = (
        r"^train: the loss or gradients were NaN or inf for 3 steps in a row after step 2 \(train.max_nonfinite_steps\); "
        r"stopped, keeping the checkpoints in .*checkpoints\. Lower train.learning_rate"
    )
    with pytest.raises(KilnError, match=expected):
        run(settings, train_paths(project, plan, tmp_path))
    saved = checkpoints(tmp_path / "kiln" / "checkpoints")
    assert [json.loads((path / "state.json").read_text())["global_step"] for path in saved] == [1, 2]


@pytest.fixture
def no_model_load(monkeypatch):
    """The trainer's model loader, made to fail the test if anything reaches it."""
    import pipeline.train as train

    def refuse(params):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(train, "load_model", refuse)


def test_train_before_balance_says_what_to_run_before_loading_the_model(tmp_path, no_model_load):
    plan = tmp_path / "data/plan/plan.parquet"
    paths = TrainPaths(plan, tmp_path / "latents", tmp_path / "latents/index.parquet", tmp_path / "models")
    with pytest.raises(KilnError) as error:
        run(params_for("tiny-sd15"), paths)
    assert str(error.value) == f"{plan}: not found; run `kiln balance` first"
    assert not (tmp_path / "models").exists()


def test_train_before_cache_says_what_to_run_before_loading_the_model(sd15, tmp_path, no_model_load):
    _, plan = sd15
    index = tmp_path / "latents/index.parquet"
    with pytest.raises(KilnError) as error:
        run(params_for("tiny-sd15"), TrainPaths(plan, tmp_path / "latents", index, tmp_path / "models"))
    assert str(error.value) == f"{index}: not found; run `kiln cache` first"
    assert not (tmp_path / "models").exists()


def test_resume_latest_without_a_checkpoint_fails_before_loading_and_leaves_no_run_folder(sd15, tmp_path, no_model_load):
    project, plan = sd15
    with pytest.raises(KilnError) as error:
        run(params_for("tiny-sd15"), train_paths(project, plan, tmp_path / "models"), resume="latest")
    assert str(error.value) == (
        f"--resume latest: no checkpoint in {tmp_path / 'models/kiln/checkpoints'}; "
        "start this run fresh with --resume auto (the default) or --resume none"
    )
    assert not (tmp_path / "models").exists()
