"""What a run writes: the LoRA and full-model files, their EMA twins, the diffusers LoRA, the metadata."""

import hashlib
import io
import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.train import Interrupted, run
from tests.conftest import params_for, sigterm_during_step, train_paths, unet_output

EPOCH = "1700000000"  # SOURCE_DATE_EPOCH in the tests that compare bytes or exact time stamps


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_diffusers_format_lora_loads_and_matches_the_kohya_file(sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipeline.presets import preset_dir


    project, plan = sd15
    result = run(params_for("tiny-sd15", max_train_steps=2, save_diffusers_lora=True, learning_rate=1e-2), train_paths(project, plan, tmp_path))
    folder = tmp_path / "kiln" / "diffusers_lora"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert (folder / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
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


def test_identical_runs_write_identical_files(sd15, tmp_path, monkeypatch):
    # DVC's "only changed steps rerun" needs the same bytes for the same inputs: the LoRA, its EMA twin.
    # The time stamps in them are SOURCE_DATE_EPOCH's (make demo and make reproduce set it).
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    project, plan = sd15
    settings = params_for("tiny-sd15", max_train_steps=2, ema_decay_rate=0.9, ema_update_interval=1)
    digests = []
    for name in ("a", "b"):
        run(settings, train_paths(project, plan, tmp_path / name))
        folder = tmp_path / name / "kiln"
        digests.append([hashlib.sha256((folder / file).read_bytes()).hexdigest() for file in ("kiln.safetensors", "kiln_ema.safetensors")])
    assert digests[0] == digests[1]
    for file, title in (("kiln.safetensors", "kiln"), ("kiln_ema.safetensors", "kiln_ema")):
        with safe_open(str(tmp_path / "a" / "kiln" / file), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["ss_training_started_at"] == metadata["ss_training_finished_at"] == "1700000000.0"
        assert metadata["modelspec.date"] == "2023-11-14T22:13:20+00:00"
        assert metadata["modelspec.title"] == title  # the twin is another model, titled by its file name


def test_without_source_date_epoch_the_time_stamps_are_the_real_ones(sd15, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    project, plan = sd15
    before = time.time()
    result = run(params_for("tiny-sd15", max_train_steps=1), train_paths(project, plan, tmp_path))
    after = time.time()
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert before <= started < finished <= after
    assert metadata["modelspec.date"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(finished)))


def test_a_malformed_source_date_epoch_is_an_error(monkeypatch):
    from pipeline.errors import KilnError
    from pipeline.saving import run_times

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2023-11-14")
    with pytest.raises(KilnError, match=r"SOURCE_DATE_EPOCH='2023-11-14': must be a whole number of seconds since 1970-01-01 UTC"):
        run_times(0.0)


def test_a_resumed_run_keeps_the_start_time_its_checkpoints_record(sd15, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    project, plan = sd15
    paths, settings = train_paths(project, plan, tmp_path), params_for("tiny-sd15", max_train_steps=3)
    with sigterm_during_step(2), pytest.raises(Interrupted):
        run(settings, paths)
    state = json.loads((tmp_path / "kiln" / "checkpoints" / "interrupted" / "state.json").read_text())
    resumed_at = time.time()
    result = run(settings, paths, resume="auto")
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert state["started_at"] < resumed_at
    assert metadata["ss_training_started_at"] == str(state["started_at"])  # the first start, not the resume


def test_lora_metadata_has_kohyas_keys_in_kohyas_formats(sd15, tmp_path, monkeypatch):
    # The plan was bucketed at 256 (tests/conftest.py BUCKETS); bucket.resolution now says 512. The
    # metadata tells what trained. The plan: `10_sks circle` 8 images x 10, `5_sks square` 6 images x 5
    # (one x 7.5: EveryDream2 multiply 1.5), `1_shape` 8 reg images balanced to 113 samples.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    project, plan = sd15
    settings = params_for(
        "tiny-sd15", max_train_steps=2, conv_dim=2, network_train_text_encoder=True, optimizer_args={"weight_decay": 0.01},
    )
    settings = settings.model_copy(update={"bucket": settings.bucket.model_copy(update={"resolution": (512, 512)})})
    result = run(settings, train_paths(project, plan, tmp_path))
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert {key: metadata[key] for key in metadata if key.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "kiln", "modelspec.resolution": "256x256",
        "modelspec.date": "2023-11-14T22:13:20+00:00", "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "1",
    }
    expected = {
        "ss_sd_model_name": "tiny-sd15",  # a preset: no path, no file to hash
        "ss_output_name": "kiln", "ss_resolution": "(256, 256)",
        "ss_training_started_at": "1700000000.0", "ss_training_finished_at": "1700000000.0",
        "ss_num_train_images": "113",  # 80 + 32.5 samples an epoch, rounded half up
        "ss_num_reg_images": "113", "ss_steps": "2", "ss_epoch": "1", "ss_num_epochs": "1", "ss_max_train_steps": "2",
        "ss_lr_warmup_steps": "0", "ss_total_batch_size": "2", "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "128", "ss_max_bucket_reso": "512", "ss_shuffle_caption": "False", "ss_keep_tokens": "0",
        "ss_flip_aug": "True",  # one circle's yaml sets flip_p 0.5
        "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "0.0001", "ss_max_grad_norm": "1.0",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)",
        "ss_loss_type": "mse", "kiln_version": "0.1.0",  # Kiln's own and the technique keys stay
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert "ss_sd_model_hash" not in metadata and "ss_new_sd_model_hash" not in metadata
    assert len(metadata["kiln_params_sha256"]) == 64
    assert metadata["ss_session_id"].isdigit() and int(metadata["ss_session_id"]) < 2**32
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}  # conv_alpha defaults to conv_dim
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "10_sks circle": {"n_repeats": 10, "img_count": 8}, "5_sks square": {"n_repeats": 32.5 / 6, "img_count": 6},
    }
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 14.125, "img_count": 8}}
    assert json.loads(metadata["ss_bucket_info"]) == {"buckets": {
        "0": {"resolution": [128, 512], "count": 5}, "1": {"resolution": [192, 320], "count": 56},
        "2": {"resolution": [256, 256], "count": 98}, "3": {"resolution": [320, 192], "count": 43},
        "4": {"resolution": [512, 128], "count": 24},
    }}
    # The final captions' comma-separated parts, per folder base name (train and reg alike).
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "10_sks circle": {
            "a sks circle": 5, "a sks circle in a wide banner": 1, "flat colour": 1, "gradient": 1, "on a blue gradient": 1,
            "portrait": 1, "purple": 1, "red": 1, "sks circle": 2, "transparent background": 1, "white on red": 1, "yellow": 1,
        },
        "1_shape": {"a purple square": 1, "a shape": 1, "shape": 7},
        "5_sks square": {"a sks square": 3, "a sks square in a tall strip": 1, "blue": 1, "orange": 1, "portrait": 1, "sks square": 2, "yellow": 1},
    }
    # A1111 reads these instead of hashing the file: the sha256 of the tensor bytes as saved, and the legacy
    # hash of the file serialized with its ss_* keys only (kohya's precalculate_safetensors_hashes).
    data = result.output.read_bytes()
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    again = safetensors_bytes(load_file(str(result.output)), {key: value for key, value in metadata.items() if key.startswith("ss_")})
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def test_single_file_metadata_has_the_checkpoint_model_spec(sd15, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    project, plan = sd15
    result = run(params_for("tiny-sd15", mode="full", up_blocks_only=True, max_train_steps=1), train_paths(project, plan, tmp_path))
    with safe_open(str(result.output), "pt") as handle:
        metadata = handle.metadata()
    assert {key: metadata[key] for key in metadata if key.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models", "modelspec.title": "kiln",
        "modelspec.resolution": "256x256", "modelspec.date": "2023-11-14T22:13:20+00:00",
        "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "1",
    }
    assert metadata["ss_training_finished_at"] == "1700000000.0" and metadata["ss_num_train_images"] == "113"
    assert metadata["ss_sd_model_name"] == "tiny-sd15" and metadata["ss_resolution"] == "(256, 256)"
    # No network, no LoRA hashes (kohya writes neither into a checkpoint), and the text encoder did not train.
    assert not [key for key in metadata if key.startswith(("ss_network", "sshs_"))] and "ss_text_encoder_lr" not in metadata


def test_model_spec_architecture_and_implementation_follow_kohya():
    from pipeline.saving import RunSummary, training_metadata

    def spec(version, prediction="epsilon", **train):
        written = training_metadata(params_for("tiny-sd15", **train), RunSummary(version, prediction), 1, 1, "0" * 64)
        return written["modelspec.architecture"], written["modelspec.implementation"], written.get("modelspec.prediction_type")

    sgm = "https://github.com/Stability-AI/generative-models"
    assert spec("sdxl") == ("stable-diffusion-xl-v1-base/lora", sgm, "epsilon")
    assert spec("sd2") == ("stable-diffusion-v2-512/lora", "diffusers", "epsilon")
    assert spec("sd2", "v_prediction") == ("stable-diffusion-v2-768-v/lora", "diffusers", "v")
    assert spec("sd2", "v_prediction", mode="full") == ("stable-diffusion-v2-768-v", sgm, "v")
    assert spec("sd2", "v_prediction", rectified_flow=True)[2] is None  # a flow's velocity is neither v nor epsilon
    ranged = training_metadata(params_for("tiny-sd15", min_timestep=500), RunSummary(), 1, 1, "0" * 64)
    assert ranged["modelspec.timestep_range"] == "500,1000"
    assert "modelspec.timestep_range" not in training_metadata(params_for("tiny-sd15"), RunSummary(), 1, 1, "0" * 64)


def test_text_encoder_lr_only_when_a_text_encoder_trains():
    from pipeline.saving import RunSummary, training_metadata

    assert "ss_text_encoder_lr" not in training_metadata(params_for("tiny-sd15"), RunSummary(), 1, 1, "0" * 64)
    trained = params_for("tiny-sd15", network_train_text_encoder=True, text_encoder_lr=5e-5)
    assert training_metadata(trained, RunSummary(), 1, 1, "0" * 64)["ss_text_encoder_lr"] == "5e-05"
    full = params_for("tiny-sd15", mode="full", train_text_encoder=True)
    assert training_metadata(full, RunSummary(), 1, 1, "0" * 64)["ss_text_encoder_lr"] == "0.0001"  # learning_rate


def test_a_file_base_is_named_not_pathed_and_hashed_as_a1111_does(tmp_path):
    from pipeline.saving import RunSummary, training_metadata
    from tests.conftest import with_model

    base = tmp_path / "private" / "folders" / "v1-5-pruned.safetensors"
    base.parent.mkdir(parents=True)
    content = torch.randint(0, 256, (0x130000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    base.write_bytes(content)
    written = training_metadata(with_model(params_for("tiny-sd15"), base=str(base)), RunSummary(), 1, 1, "0" * 64)
    assert written["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert written["ss_sd_model_hash"] == hashlib.sha256(content[0x100000:0x110000]).hexdigest()[:8]
    assert written["ss_new_sd_model_hash"] == hashlib.sha256(content).hexdigest()
    folder = training_metadata(with_model(params_for("tiny-sd15"), base=str(tmp_path / "private")), RunSummary(), 1, 1, "0" * 64)
    assert folder["ss_sd_model_name"] == "private" and "ss_sd_model_hash" not in folder
    assert str(tmp_path) not in json.dumps(written) + json.dumps(folder)


def test_sshs_hashes_equal_kohyas_computation():
    from pipeline.saving import addnet_hashes

    generator = torch.Generator().manual_seed(0)
    # Over 1.1 MiB, so that the legacy hash's 64 KiB at 1 MiB hold tensor bytes.
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(400, 400, generator=generator), "lora_unet_a.alpha": torch.tensor(2.0)}
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"x": {"y": 1}}), "modelspec.title": "kiln"}
    # sd-scripts' precalculate_safetensors_hashes, written out: only the ss_* keys, then addnet's two hashes.
    buffer = io.BytesIO(safetensors_bytes(tensors, {"ss_network_dim": "4", "ss_tag_frequency": metadata["ss_tag_frequency"]}))
    header = int.from_bytes(buffer.read(8), "little")
    buffer.seek(8 + header)
    model_hash = hashlib.sha256(buffer.read()).hexdigest()
    buffer.seek(0x100000)
    legacy_hash = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    assert addnet_hashes(tensors, metadata) == {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    assert addnet_hashes(tensors, metadata | {"modelspec.title": "other"}) == addnet_hashes(tensors, metadata)


def test_session_id_names_the_run_and_its_seed():
    from pipeline.saving import session_id

    assert session_id("a" * 64, 42) == session_id("a" * 64, 42)  # a resumed run: the same identity and seed
    assert len({session_id("a" * 64, 42), session_id("b" * 64, 42), session_id("a" * 64, 43)}) == 3
    assert all(0 <= int(session_id(run, 7)) < 2**32 for run in ("", "a", "b"))
