"""kiln import: kohya-ss and EveryDream2 configs, written from those tools' documented formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import importers
from pipeline.errors import KilnError, ParamsError
from pipeline.params import load_params

# kohya's training config: sections are read as one namespace (train_util.read_config_from_file).
KOHYA_TOML = """\
[model_arguments]
pretrained_model_name_or_path = "/models/v1-5-pruned.safetensors"
v2 = false
v_parameterization = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_dropout = 0.1
network_args = ["conv_dim=8", "conv_alpha=4"]
unet_lr = 1e-4
text_encoder_lr = 5e-5

[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 100
max_grad_norm = 1.0

[dataset_arguments]
cache_latents = true
shuffle_caption = true
keep_tokens = 1
resolution = "512,512"
caption_extension = ".txt"

[training_arguments]
output_dir = "/out"
output_name = "sks_dog"
save_precision = "fp16"
save_every_n_epochs = 2
save_last_n_epochs = 3
train_batch_size = 4
max_train_epochs = 10
seed = 1234
gradient_checkpointing = true
gradient_accumulation_steps = 2
mixed_precision = "bf16"
xformers = true
clip_skip = 2
noise_offset = 0.05
min_snr_gamma = 5.0
prior_loss_weight = 1.0
logging_dir = "/logs"
max_data_loader_n_workers = 4

[sample_prompt_arguments]
sample_every_n_steps = 200
sample_sampler = "k_euler_a"
sample_prompts = "prompts.txt"

[saving_arguments]
save_model_as = "safetensors"
"""

# kohya's dataset config (docs/config_README-en.md): [general] < [[datasets]] < [[datasets.subsets]].
DATASET_TOML = """\
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = false

[[datasets]]
resolution = 768
batch_size = 2
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 1280
bucket_reso_steps = 64
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "/data/dog"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "/data/dog closeups"
  class_tokens = "sks dog"
  num_repeats = 5
  flip_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = "/data/reg/dog"
  class_tokens = "dog"
  num_repeats = 1
"""

# EveryDream2's train.json and optimizer.json, as the repository ships them (with EMA and min-SNR set).
ED2_TRAIN = {
    "amp": True, "batch_size": 6, "ckpt_every_n_minutes": 30, "clip_grad_norm": None, "clip_skip": 0,
    "cond_dropout": 0.04, "data_root": "/mnt/q/training_samples/ff7r", "disable_textenc_training": False,
    "disable_xformers": False, "flip_p": 0.0, "gpuid": 0, "gradient_checkpointing": True, "grad_accum": 1,
    "logdir": "logs", "log_step": 25, "lowvram": False, "lr": 1.5e-06, "lr_decay_steps": 0,
    "lr_scheduler": "constant", "lr_warmup_steps": None, "max_epochs": 30, "notebook": False,
    "optimizer_config": "optimizer.json", "project_name": "ff7r_cloud", "resolution": 512,
    "resume_ckpt": "sd_v1-5_vae", "run_name": None, "sample_prompts": "sample_prompts.txt", "sample_steps": 300,
    "save_ckpt_dir": None, "save_ckpts_from_n_epochs": 0, "save_every_n_epochs": 10, "save_optimizer": False,
    "scale_lr": False, "seed": 555, "shuffle_tags": False, "validation_config": "validation_default.json",
    "wandb": False, "write_schedule": False, "rated_dataset": False, "rated_dataset_target_dropout_percent": 50,
    "zero_frequency_noise_ratio": 0.02, "enable_zero_terminal_snr": False, "load_settings_every_epoch": False,
    "min_snr_gamma": 5.0, "ema_decay_rate": None, "ema_strength_target": 0.1, "ema_update_interval": 50,
    "ema_device": "cpu", "ema_sample_nonema_model": False, "ema_sample_ema_model": True, "ema_resume_model": None,
    "keep_tags": 1,
}
ED2_OPTIMIZER = {
    "doc": {"base": "base optimizer configuration for unet and text encoder"},
    "base": {
        "optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "cosine", "lr_decay_steps": None,
        "lr_warmup_steps": None, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.010,
    },
    "text_encoder_overrides": {
        "optimizer": None, "lr": 5e-7, "lr_scheduler": None, "lr_decay_steps": None, "lr_warmup_steps": None,
        "betas": None, "epsilon": None, "weight_decay": 0.1,
    },
    "text_encoder_freezing": {"freeze_embeddings": False, "freeze_front_n_layers": None, "freeze_final_layer_norm": False},
    "apply_grad_scaler_step_tweaks": True,
}


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def kohya(tmp_path: Path, config: str = KOHYA_TOML, dataset: str | None = DATASET_TOML) -> importers.Imported:
    config_file = _write(tmp_path, "train.toml", config)
    dataset_file = _write(tmp_path, "dataset.toml", dataset) if dataset is not None else None
    loaded, loaded_dataset = importers.read_kohya(config_file, dataset_file)
    return importers.import_kohya(loaded, loaded_dataset, "train.toml", "data/raw")


def everydream(tmp_path: Path, train: dict | None = None, optimizer: dict | None = None) -> importers.Imported:
    train_file = _write(tmp_path, "train.json", json.dumps(train or ED2_TRAIN, indent=2))
    optimizer_file = _write(tmp_path, "optimizer.json", json.dumps(optimizer or ED2_OPTIMIZER, indent=2))
    loaded, loaded_optimizer, validation, name = importers.read_everydream(train_file, optimizer_file)
    return importers.import_everydream(loaded, loaded_optimizer, validation, "train.json", name, "data/raw")


def test_kohya_maps_every_option(tmp_path: Path) -> None:
    imported = kohya(tmp_path)
    assert {key: mapped.value for key, mapped in imported.mapped.items()} == {
        "train.mode": "lora",
        "train.network_train_text_encoder": True,  # kohya's LoRA trains it unless network_train_unet_only
        "train.train_text_encoder": False,
        "train.conv_dim": 8,
        "train.conv_alpha": 4,
        "train.learning_rate": 1e-4,  # unet_lr
        "train.text_encoder_lr": 5e-5,
        "train.max_epochs": 10,
        "train.max_train_steps": None,  # kohya's epochs win; Kiln's steps would
        "train.lr_warmup_steps": 100,
        "train.optimizer": "adamw8bit",
        "train.optimizer_args": {"weight_decay": 0.01, "betas": [0.9, 0.99]},
        "bucket.resolution": 768,  # the dataset config wins over the training config's 512,512
        "train.batch_size": 2,
        "bucket.min_bucket_reso": 320,
        "bucket.max_bucket_reso": 1280,
        "bucket.bucket_reso_steps": 64,
        "bucket.bucket_no_upscale": True,
        "train.shuffle_tags": True,
        "train.keep_tags": 1,
        "scan.caption_extensions": [".txt"],
        "train.flip_p": 0.0,
        "train.cond_dropout": 0.0,  # kohya's default, not Kiln's 0.04
        "train.caption_tag_dropout_rate": 0.0,
        "model.base": "/models/v1-5-pruned.safetensors",
        "model.v_parameterization": False,
        "train.network_dim": 32,
        "train.network_alpha": 16,
        "train.network_dropout": 0.1,
        "train.lr_scheduler": "cosine_with_restarts",
        "train.clip_grad_norm": 1.0,
        "train.output_name": "sks_dog",
        "train.save_precision": "fp16",
        "train.save_every_n_epochs": 2,
        "train.save_last_n": 3,
        "train.seed": 1234,
        "train.gradient_checkpointing": True,
        "train.grad_accum": 2,
        "train.mixed_precision": "bf16",
        "train.attn_type": "xformers",
        "train.clip_skip": 2,
        "train.noise_offset": 0.05,
        "train.min_snr_gamma": 5.0,
        "balance.prior_loss_weight": 1.0,
        "train.workers": 4,
        "train.sample_every_n_steps": 200,
        "train.sample_sampler": "k_euler_a",
        "train.sample_prompts": "prompts.txt",
        "train.save_every_n_steps": None,
        "train.sample_every_n_epochs": None,
    }
    assert imported.mapped["train.cond_dropout"].source == "caption_dropout_rate (kohya default)"
    assert imported.mapped["bucket.resolution"].source == "datasets[0].resolution"


def test_kohya_reports_every_unmapped_option(tmp_path: Path) -> None:
    imported = kohya(tmp_path)
    priority = "the dataset config sets it for every dataset (kohya gives it priority)"
    assert [(unmapped.source, unmapped.reason) for unmapped in imported.unmapped] == [
        ("datasets[0].enable_bucket", "Kiln always buckets (the bucket stage)"),
        ("datasets[0].subsets[1].flip_aug", "Kiln has one value for every image; general.flip_aug = False was taken; "
         "set it per folder in the folder's local.yaml (flip_p: 0.5)"),
        ("v2", "Kiln reads the architecture from model.base"),
        ("lr_scheduler_num_cycles", "Kiln's cosine_with_restarts runs one cycle"),
        ("cache_latents", "Kiln always caches latents (the cache stage)"),
        ("shuffle_caption", priority),
        ("keep_tokens", priority),
        ("resolution", priority),
        ("caption_extension", priority),
        ("output_dir", "Kiln writes models/<train.output_name>/"),
        ("train_batch_size", priority),
        ("logging_dir", "Kiln logs to models/<train.output_name>/logs (TensorBoard and dvclive)"),
        ("save_model_as", "Kiln saves a LoRA as .safetensors, a full fine-tune as a diffusers folder"),
    ]


def test_kohya_subsets_are_hard_linked_into_concept_folders(tmp_path: Path) -> None:
    imported = kohya(tmp_path)
    assert imported.commands == [
        "mkdir -p 'data/raw/train/10_sks dog' && cp -rl '/data/dog/.' 'data/raw/train/10_sks dog/'",
        "mkdir -p 'data/raw/train/5_sks dog' && cp -rl '/data/dog closeups/.' 'data/raw/train/5_sks dog/'",
        "mkdir -p 'data/raw/reg/1_dog' && cp -rl '/data/reg/dog/.' 'data/raw/reg/1_dog/'",
    ]


def test_kohya_folders_already_named_link_the_whole_kind(tmp_path: Path) -> None:
    dataset = """\
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "/data/sets/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "/data/sets/2_sks dog"
  num_repeats = 2
"""
    imported = kohya(tmp_path, "network_module = 'networks.lora'\n", dataset)
    # A symlinked concept folder would leave the data root (RootGuard refuses it); train/ itself may be a link.
    assert imported.commands == ["mkdir -p 'data/raw' && ln -s '/data/sets' 'data/raw/train'"]
    assert "scan.data_root" not in imported.mapped


def test_kohya_folders_forming_train_and_reg_become_the_data_root(tmp_path: Path) -> None:
    dataset = """\
[[datasets]]
  [[datasets.subsets]]
  image_dir = "/data/proj/train/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "/data/proj/reg/1_dog"
  class_tokens = "dog"
  is_reg = true
"""
    imported = kohya(tmp_path, "resolution = 512\n", dataset)
    assert imported.mapped["scan.data_root"].value == "/data/proj"
    assert imported.commands == []


def test_kohya_without_dataset_config_links_train_data_dir(tmp_path: Path) -> None:
    config = 'train_data_dir = "/data/train"\nreg_data_dir = "/data/reg"\nresolution = "768,512"\nmax_train_steps = 2000\n'
    imported = kohya(tmp_path, config, None)
    assert imported.commands == [
        "mkdir -p 'data/raw' && ln -s '/data/train' 'data/raw/train'",
        "mkdir -p 'data/raw' && ln -s '/data/reg' 'data/raw/reg'",
    ]
    assert imported.mapped["bucket.resolution"].value == "768,512"
    assert imported.mapped["train.max_train_steps"].value == 2000
    assert imported.mapped["train.mode"].value == "full"  # no network_module: a full fine-tune
    assert imported.mapped["train.learning_rate"].value == 2e-6  # kohya's default
    unmapped = {item.source: item.reason for item in imported.unmapped}
    assert unmapped["train_data_dir"] == "put its concept folders under data/raw/train/ (or make that folder a symlink to it)"


def test_everydream_maps_every_option(tmp_path: Path) -> None:
    imported = everydream(tmp_path)
    assert {key: mapped.value for key, mapped in imported.mapped.items()} == {
        "train.mode": "full",
        "scan.require_repeats_prefix": False,
        "scan.recursive": True,
        "scan.caption_from_filename": True,
        "train.max_epochs": 30,
        "train.max_train_steps": None,
        "train.learning_rate": 1.5e-06,  # train.json's lr wins over optimizer.json's
        "train.lr_scheduler": "cosine",  # optimizer.json's base wins over train.json's
        "train.optimizer": "adamw8bit",
        "train.optimizer_args": {"betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01},
        "train.text_encoder_lr": 5e-07,
        "train.mixed_precision": "fp16",
        "train.batch_size": 6,
        "train.clip_grad_norm": None,
        "train.clip_skip": 1,
        "train.cond_dropout": 0.04,
        "train.train_text_encoder": True,
        "train.flip_p": 0.0,
        "train.gradient_checkpointing": True,
        "train.grad_accum": 1,
        "train.log_step": 25,
        "train.output_name": "ff7r_cloud",
        "bucket.resolution": 512,
        "model.base": "sd_v1-5_vae",
        "train.sample_prompts": "sample_prompts.txt",
        "train.sample_every_n_steps": 300,
        "train.save_every_n_epochs": 10,
        "train.save_every_n_minutes": 30,
        "train.scale_lr": False,
        "train.seed": 555,
        "train.shuffle_tags": False,
        "train.write_schedule": False,
        "train.noise_offset": 0.02,
        "train.zero_terminal_snr": False,
        "train.load_settings_every_epoch": False,
        "train.min_snr_gamma": 5.0,
        "train.ema_decay_rate": None,
        "train.ema_strength_target": 0.1,
        "train.ema_update_interval": 50,
        "train.ema_device": "cpu",
        "train.ema_sample_nonema_model": False,
        "train.ema_sample_ema_model": True,
        "train.ema_resume_model": None,
        "train.keep_tags": 1,
    }
    assert imported.mapped["train.train_text_encoder"].note == (
        "EveryDream2 trains the text encoder unless disable_textenc_training; Kiln's default is off"
    )
    assert imported.commands == ["mkdir -p 'data/raw' && ln -s '/mnt/q/training_samples/ff7r' 'data/raw/train'"]


def test_everydream_reports_every_unmapped_option(tmp_path: Path) -> None:
    imported = everydream(tmp_path)
    assert {unmapped.source: unmapped.reason for unmapped in imported.unmapped} == {
        "data_root": "its folders are Kiln's data/raw/train/: make that folder a symlink to it",
        "lr_decay_steps": "unset: EveryDream2 derives 1.5 x the total steps, Kiln 1.2 x for cosine",
        "optimizer.json base.lr": "train.json's lr wins (EveryDream2's precedence)",
        "lr_scheduler": "optimizer.json base.lr_scheduler wins (EveryDream2's precedence)",
        "optimizer.json text_encoder_overrides.weight_decay":
            "Kiln gives the text encoder the UNet's optimizer settings; only its learning rate differs",
        "optimizer.json doc": "documentation only",
        "optimizer.json text_encoder_freezing": "Kiln trains the whole text encoder or none of it",
        "optimizer.json apply_grad_scaler_step_tweaks": "Kiln uses accelerate's grad scaler",
        "lr_warmup_steps": "EveryDream2 derives 2% of lr_decay_steps; set train.lr_warmup_steps",
        "optimizer_config": "read: its options follow",
        "validation_config": "not found here or beside train.json: its validation settings were not read",
        "disable_xformers": "Kiln's attention is train.attn_type (sdp by default)",
        "gpuid": "choose the GPU with CUDA_VISIBLE_DEVICES",
        "logdir": "Kiln logs to models/<train.output_name>/logs",
        "lowvram": "set train.gradient_checkpointing and a small train.batch_size",
        "notebook": "no equivalent",
        "run_name": "Kiln names the run train.output_name",
        "save_ckpt_dir": "Kiln writes models/<train.output_name>/",
        "save_ckpts_from_n_epochs": "Kiln saves from the first period on",
        "save_optimizer": "Kiln's checkpoints always hold the optimizer state",
        "wandb": "Kiln logs to TensorBoard and dvclive",
        "rated_dataset": "no equivalent",
        "rated_dataset_target_dropout_percent": "no equivalent",
    }


def test_everydream_validation_config_maps_the_split(tmp_path: Path) -> None:
    validation = {"validate_training": True, "val_split_mode": "automatic", "val_split_proportion": 0.15, "every_n_epochs": 1}
    (tmp_path / "validation_default.json").write_text(json.dumps(validation))
    imported = everydream(tmp_path)
    assert imported.mapped["train.validation_split"].value == 0.15
    assert {u.source: u.reason for u in imported.unmapped}["validation every_n_epochs"] == (
        "Kiln validates every train.validate_every steps; set it"
    )


def test_render_keeps_the_project_params_and_replaces_mapped_keys(tmp_path: Path) -> None:
    project = _write(tmp_path, "params.yaml", "model:\n  base: tiny-sd15   # the base\ntrain:\n  lr: 0.5\n  mixed_precision: \"no\"\n")
    base = importers.load_base(project)
    text = importers.render(everydream(tmp_path), base, "out.yaml")
    assert "  base: sd_v1-5_vae # the base\n" in text  # comments kept
    assert "  optimizer_args: {betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.01}\n" in text
    data = yaml.safe_load(text)
    assert "lr" not in data["train"]  # the alias gives way to the canonical name
    out = tmp_path / "out.yaml"
    importers.write_params(text, out)
    params = load_params(out)
    assert params.train.learning_rate == 1.5e-06
    assert params.train.optimizer_args == {"betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01}
    assert params.train.mixed_precision == "fp16"


def test_render_without_project_params_starts_from_defaults(tmp_path: Path) -> None:
    base = importers.load_base(tmp_path / "missing.yaml")
    text = importers.render(kohya(tmp_path), base, "out.yaml")
    data = yaml.safe_load(text)
    assert set(data) == {"model", "scan", "caption", "tag", "bucket", "cache", "balance", "train"}
    assert data["train"]["text_encoder_lr"] == 5e-05 and data["bucket"]["resolution"] == 768


def test_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    imported = kohya(tmp_path, '[optimizer_arguments]\noptimizer_type = "DAdaptAdam"\n', None)
    with pytest.raises(ParamsError) as error:
        importers.render(imported, importers.load_base(tmp_path / "missing.yaml"), "out.yaml")
    assert str(error.value) == (
        "train.toml: optimizer_type = 'DAdaptAdam': Kiln has no such optimizer; it has adamw, adamw8bit, lion, "
        "prodigy, adafactor, sgd, adacoor"
    )


def test_everydream_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    optimizer = {**ED2_OPTIMIZER, "base": {**ED2_OPTIMIZER["base"], "optimizer": "dadapt_adam"}}
    imported = everydream(tmp_path, optimizer=optimizer)
    assert imported.problems == [
        "train.json: optimizer.json base.optimizer = 'dadapt_adam': Kiln has no such optimizer; it has adamw, "
        "adamw8bit, lion, prodigy, adafactor, sgd, adacoor"
    ]


def test_a_value_kiln_refuses_names_its_source_option(tmp_path: Path) -> None:
    imported = kohya(tmp_path, "clip_skip = 12\n", None)
    with pytest.raises(ParamsError) as error:
        importers.render(imported, importers.load_base(tmp_path / "missing.yaml"), "out.yaml")
    assert str(error.value) == "train.toml: clip_skip -> train.clip_skip: Input should be less than or equal to 4 (got 12)"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.toml", "learning_rate = 1e-4\nunet_lr = \n")
    with pytest.raises(KilnError) as error:
        importers.read_config(path)
    assert str(error.value) == f"{path}:2:11: not valid TOML: Invalid value"


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.json", '{\n  "lr": 1e-6,\n}\n')
    with pytest.raises(KilnError) as error:
        importers.read_config(path)
    assert str(error.value) == f"{path}:3:1: not valid JSON: Expecting property name enclosed in double quotes"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="file not found"):
        importers.read_config(tmp_path / "nope.toml")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = _write(tmp_path, "params.yaml", "{}\n")
    with pytest.raises(KilnError) as error:
        importers.check_out(out, force=False)
    assert str(error.value) == f"{out}: already exists; pass --force to overwrite it, or --out to write elsewhere"
    importers.check_out(out, force=True)


def test_kohya_cache_text_encoder_outputs_maps_and_needs_a_frozen_text_encoder(tmp_path: Path) -> None:
    frozen = kohya(tmp_path, "network_module = 'networks.lora'\nnetwork_train_unet_only = true\ncache_text_encoder_outputs = true\n", None)
    assert frozen.mapped["train.cache_text_encoder_outputs"].value is True
    importers.render(frozen, importers.load_base(tmp_path / "missing.yaml"), "out.yaml")
    training = kohya(tmp_path, "network_module = 'networks.lora'\ncache_text_encoder_outputs = true\n", None)
    with pytest.raises(ParamsError, match=r"train.cache_text_encoder_outputs: the text encoder trains in this run"):
        importers.render(training, importers.load_base(tmp_path / "missing.yaml"), "out.yaml")
