"""Typed params: one pydantic model per params.yaml section, validated before any work starts.

Option names follow kohya-ss/sd-scripts and EveryDream2. Where the two disagree, the field carries one
name and accepts the other as an alias (`learning_rate` / `lr`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ParamsError

# While a `recording_reads()` block runs, every params key a stage reads ("section.key") is added here,
# so a test can check that dvc.yaml declares every key a stage's outputs depend on.
_READS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("kiln_param_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    reads: set[str] = set()
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


# torch's and numpy's integers are 64-bit: a larger seed or count passes Python but overflows there.
INT64_MESSAGE = "must lie between -2**63 and 2**63 - 1"
FINITE_MESSAGE = "Input should be a finite number"  # pydantic's words for a typed float, used for any other
# The largest batch_size any stage accepts: `fill` builds each batch up front, and no GPU holds a larger
# Stable Diffusion batch.
MAX_BATCH_SIZE = 4096


def _out_of_range(value: Any) -> str | None:
    """Why `value` (or a number inside it) cannot reach training intact, or None.

    Depth first without recursion, each container once: YAML aliases can share one list many times
    over (a "billion laughs") or put a list inside itself, which no JSON dump of the params survives."""
    stack, ancestors, done = [(value, False)], set(), set()
    while stack:
        item, leaving = stack.pop()
        if leaving:
            ancestors.discard(id(item))
            done.add(id(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return FINITE_MESSAGE
        elif isinstance(item, int) and not isinstance(item, bool) and not -(2**63) <= item < 2**63:
            return INT64_MESSAGE
        elif isinstance(item, (list, tuple, dict)) and id(item) not in done:
            if id(item) in ancestors:
                return "must not contain itself"
            ancestors.add(id(item))
            stack.append((item, True))
            stack.extend((child, False) for child in (item.values() if isinstance(item, dict) else item))
    return None


class CheckedModel(BaseModel):
    """Every float in it is finite and every integer 64-bit: nan, inf and huge numbers pass pydantic's
    bounds (inf > 0) but poison or crash training."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        problem = _out_of_range(value)
        if problem:
            raise ValueError(problem)
        return value


class Section(CheckedModel):
    """A params.yaml section: unknown keys are errors, and every field's docstring is its help text."""

    SECTION: ClassVar[str] = ""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        populate_by_name=True,
        validate_default=True,
        frozen=True,
    )

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            reads = _READS.get()
            if reads is not None and name in type(self).model_fields:
                reads.add(f"{type(self).SECTION}.{name}")
        return super().__getattribute__(name)

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        # pydantic silently takes the first alias it finds; a user who wrote both `lr` and
        # `learning_rate` should hear that one of them is being ignored.
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                given = [key for key in field_names(name, field) if key in data]
                if len(given) > 1:
                    raise ParamsError(
                        f"{cls.SECTION}.{given[1]}: same setting as {cls.SECTION}.{given[0]}; keep one"
                    )
        return data


def field_names(name: str, field: Any) -> list[str]:
    """The field's name and its aliases, the name first."""
    names = [name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names += [choice for choice in alias.choices if isinstance(choice, str) and choice != name]
    elif isinstance(alias, str) and alias != name:
        names.append(alias)
    return names


def _aliases(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ModelParams(Section):
    SECTION: ClassVar[str] = "model"

    base: str = Field("tiny-sd15", validation_alias=_aliases("base", "pretrained_model_name_or_path"))
    """The base model (kohya `pretrained_model_name_or_path`): a diffusers folder, a single .safetensors/.ckpt file, a hub id (used only when it
    is already cached or reachable), or a built-in random preset (`tiny-sd15`, `tiny-sdxl`)."""

    config: str | None = None
    """For a single-file `base` (.safetensors/.ckpt): a diffusers folder, preset or hub id of the same
    architecture whose configs and tokenizers diffusers' `from_single_file` uses (its `config=`). Unset,
    diffusers fetches them from the hub, which needs network or a cached copy."""

    v_parameterization: bool | None = None
    """The base predicts velocity (SD 2.x 768-v). Unset, it is read from the base's scheduler config
    (prediction_type); true or false overrides that (kohya's `v_parameterization`)."""

    @field_validator("base")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model folder, file, hub id or preset (tiny-sd15, tiny-sdxl)")
        return value


IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"]


class ScanParams(Section):
    SECTION: ClassVar[str] = "scan"

    data_root: str = "data/raw"
    """The folder holding train/ and reg/, each of kohya concept folders (`train/10_sks dog/`): the one place
    the dataset's location is set (dvc.yaml's scan dependency reads it too). A path relative to the project,
    or absolute. kohya's `train_data_dir` is this folder's train/; EveryDream2's `data_root` is too."""

    require_repeats_prefix: bool = True
    """Concept folders must be named `<repeats>_<class tokens>` (kohya's convention). When true, a folder
    without the numeric prefix is skipped with a warning, as kohya does; when false it is taken with
    repeats 1 and its whole name as the class tokens."""

    recursive: bool = False
    """Also take images from sub-folders of each concept folder (kohya's `recursive`)."""

    caption_extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".caption"],
        validation_alias=_aliases("caption_extensions", "caption_extension"),
    )
    """Caption sidecar extensions, tried in this order; the first line of the first one found is the
    caption. kohya's `caption_extension` is accepted as an alias and may be a single string."""

    caption_from_filename: bool = False
    """When no sidecar or yaml caption exists, use the file name's text before the first `_` as the
    caption (EveryDream2's filename captions) before falling back to the class tokens."""

    image_extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    """File extensions taken as images; other files are ignored (sidecars are read, not scanned)."""

    min_side: int = Field(256, ge=1)
    """Reject images whose shorter side (after EXIF orientation) is below this many pixels."""

    max_pixels: int = Field(178_956_970, ge=1)
    """Reject images with more pixels than this before decoding them: the decompression-bomb guard
    (Pillow's own hard limit by default)."""

    mask_suffix: str = "-masklabel"
    """A mask next to an image is `<stem><mask_suffix>.png` (EveryDream2's convention)."""

    masks_dir: str | None = None
    """Optional folder, relative to the data root, that mirrors train/ and reg/ with one `<stem>.png`
    mask per image. Consulted when no mask sits next to the image."""

    workers: int = Field(0, ge=0)
    """Processes that decode and hash images; 0 uses every core."""

    @field_validator("caption_extensions", "image_extensions", mode="before")
    @classmethod
    def _extension_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [ext if str(ext).startswith(".") else f".{ext}" for ext in value]
        return value

    @field_validator("caption_extensions", "image_extensions")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one extension")
        return [ext.lower() for ext in value]


def _resolution(value: Any) -> Any:
    """512, "512", "768,512" or [768, 512] -> (width, height), as kohya's --resolution."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace("x", ",").split(",")]
        if not all(part.isdigit() for part in parts) or len(parts) not in (1, 2):
            raise ValueError(f"must be one number or W,H (got {value!r})")
        numbers = [int(part) for part in parts]
        return (numbers[0], numbers[-1])
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return (value[0], value[0])
    return value


class BucketParams(Section):
    SECTION: ClassVar[str] = "bucket"

    resolution: tuple[int, int] = (512, 512)
    """Training resolution: one number or W,H. Its area is the area of every bucket (kohya)."""

    min_bucket_reso: int = Field(256, ge=1)
    """Smallest bucket side in pixels (kohya)."""

    max_bucket_reso: int = Field(1024, ge=1)
    """Largest bucket side in pixels (kohya)."""

    bucket_reso_steps: int = Field(64, ge=1)
    """Bucket sides are multiples of this; 64 is safe for every SD family (kohya)."""

    bucket_no_upscale: bool = False
    """Never upscale: an image is only scaled down to at most the resolution's area, keeping its aspect
    ratio, each side floored to `bucket_reso_steps` (kohya)."""

    interpolation: Literal["lanczos", "area", "bicubic"] = "lanczos"
    """Resampling filter used to resize an image to cover its bucket."""

    random_crop: bool = False
    """Crop the overflow at a random offset instead of the centre. The offset is drawn once, here, from
    `seed` and the image_id, so the cached latent stays valid."""

    seed: int = 42
    """Seed for random crops."""

    max_aspect_error: float = Field(0.25, ge=0)
    """Warn about images whose aspect ratio differs from their bucket's by more than this fraction."""

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return _resolution(value)

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"sides must be positive (got {value[0]},{value[1]})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BucketParams:
        step = self.bucket_reso_steps
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ParamsError(
                f"bucket.min_bucket_reso: must be ≤ bucket.max_bucket_reso "
                f"(got {self.min_bucket_reso} > {self.max_bucket_reso})"
            )
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, key) % step:
                raise ParamsError(
                    f"bucket.{key}: must be a multiple of bucket.bucket_reso_steps={step} "
                    f"(got {getattr(self, key)})"
                )
        side = int((self.resolution[0] * self.resolution[1]) ** 0.5)
        if not self.min_bucket_reso <= side <= self.max_bucket_reso:
            raise ParamsError(
                f"bucket.resolution: its square side ({side}) must lie in "
                f"[bucket.min_bucket_reso={self.min_bucket_reso}, bucket.max_bucket_reso={self.max_bucket_reso}]"
            )
        return self


class InferenceParams(Section):
    """Settings shared by the stages that run a model over every image (caption, tag)."""

    reg_images: bool = False
    """Also run the model on regularisation images. Off (kohya's behaviour): a reg image keeps its own
    sidecar or yaml caption, else balance gives it its folder's class tokens."""

    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    """Images per model call. A batch that fails is retried image by image."""

    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Model precision; `auto` is float16 on CUDA and float32 on CPU."""

    workers: int = Field(0, ge=0)
    """Threads that decode images while the model runs; 0 uses every core."""

    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code. Off unless you trust the model's author."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class Replacement(CheckedModel):
    """One regex replacement applied to every caption, in list order."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    pattern: str
    """A Python regular expression."""

    replace: str = ""
    """What each match becomes; `\\1` refers to a group."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class CaptionParams(InferenceParams):
    SECTION: ClassVar[str] = "caption"

    model: str | None = None
    """The captioner: a local folder or a hub id (e.g. `Salesforce/blip-image-captioning-large`); any
    transformers image-to-text model (BLIP, BLIP-2, GIT ...) loaded with AutoProcessor. null (the default)
    turns model captioning off: captions pass through from sidecars, yaml and folder names unchanged.
    `tiny-blip` is a random model for tests: its captions are noise."""

    mode: Literal["missing", "overwrite", "append", "prepend"] = "missing"
    """`missing`: caption only images without a sidecar or yaml caption; `overwrite`: replace every
    caption; `append` / `prepend`: add the model's caption after / before the existing one."""

    prompt: str | None = None
    """Conditional text the caption continues (BLIP's conditional captioning), e.g. `a photo of`."""

    max_new_tokens: int = Field(75, ge=1)
    """Longest caption, in tokens (kohya's make_captions `max_length`)."""

    num_beams: int = Field(1, ge=1)
    """Beam search width; 1 is greedy decoding."""

    separator: str = ", "
    """Joins the existing and the model's caption in append / prepend mode."""

    lowercase: bool = False
    """Lower-case every caption."""

    replacements: list[Replacement] = Field(default_factory=list)
    """Regex replacements applied to every caption, in order: a list of {pattern, replace}."""

    dedupe_phrases: bool = True
    """Drop repeated comma-separated phrases, keeping the first."""


class TagParams(InferenceParams):
    SECTION: ClassVar[str] = "tag"

    backend: Literal["wd14", "clip"] = "wd14"
    """`wd14`: an ONNX WD14-style tagger (model.onnx + selected_tags.csv); `clip`: zero-shot CLIP
    scoring of a vocabulary file."""

    model: str | None = None
    """The tagger: a local folder or a hub id (e.g. `SmilingWolf/wd-v1-4-convnext-tagger-v2`). null (the
    default) turns tagging off: only tags from EveryDream2 yaml sidecars reach the captions. `tiny-wd14`
    and `tiny-clip` are random models for tests: their tags are noise."""

    general_threshold: float = Field(0.35, ge=0, le=1)
    """WD14: keep general tags (category 0) scoring at least this (kohya `general_threshold`)."""

    character_threshold: float = Field(0.85, ge=0, le=1)
    """WD14: keep character tags (category 4) scoring at least this (kohya `character_threshold`)."""

    include_ratings: bool = False
    """WD14: also keep the best rating tag (category 9)."""

    underscores_to_spaces: bool = Field(True, validation_alias=_aliases("underscores_to_spaces", "remove_underscore"))
    """Write `long_hair` as `long hair` (kohya `remove_underscore`)."""

    character_tags_first: bool = False
    """Put character tags before general tags (kohya `character_tags_first`)."""

    max_tags: int | None = Field(None, ge=1)
    """Keep at most this many tags per image, highest scores first."""

    blacklist: list[str] = Field(default_factory=list, validation_alias=_aliases("blacklist", "undesired_tags"))
    """Tags never written (kohya `undesired_tags`), matched after underscore replacement."""

    replacements: dict[str, str] = Field(default_factory=dict, validation_alias=_aliases("replacements", "tag_replacement"))
    """Rename tags: {from: to}, matched after underscore replacement (kohya `tag_replacement`)."""

    vocabulary: str | None = None
    """CLIP: a text file with one candidate tag per line."""

    clip_threshold: float = Field(0.25, ge=-1, le=1)
    """CLIP: keep tags whose image-text cosine similarity is at least this."""

    top_k: int | None = Field(None, ge=1)
    """CLIP: keep only the k best-scoring tags (after the threshold)."""

    @model_validator(mode="after")
    def _clip_needs_vocabulary(self) -> TagParams:
        if self.backend == "clip" and self.model and not self.vocabulary:
            raise ParamsError("tag.vocabulary: the clip backend needs a vocabulary file (one tag per line)")
        return self


class CacheParams(Section):
    SECTION: ClassVar[str] = "cache"

    vae: str | None = None
    """Encode with this VAE instead of model.base's (a folder, a single file or a hub id), for example a
    fixed fp16 SDXL VAE."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Precision the latent mean and std are stored in."""

    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Precision the VAE encodes in; `auto` is bfloat16 on CUDA and float32 on CPU. A half-precision
    batch that yields NaN or inf is re-encoded in float32 (what kohya's `no_half_vae` avoids)."""

    flip_latents: bool = False
    """Also encode the horizontally flipped crop of every image (images whose yaml sets flip_p > 0 get
    one regardless), so the trainer's flip_p needs no re-encoding."""

    masks: bool = True
    """Store each image's mask (a mask file, else its alpha channel) at latent size, for masked training."""

    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    """Images per VAE call on a GPU (a short batch is padded, so a latent's bits never depend on its
    neighbours); a batch always holds one bucket. On the CPU images are encoded one at a time."""

    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""

    workers: int = Field(0, ge=0)
    """Threads that decode and crop images while the VAE runs; 0 uses every core."""

    shard_max_count: int = Field(1000, ge=1)
    """Latents per shard, at most; shards end after content-chosen keys, a quarter of this apart on average."""

    shard_max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Bytes per shard, at most (a shard always holds at least one latent)."""

    lock_timeout: float = Field(0.0, ge=0)
    """Seconds to wait for another `kiln cache` writing the same store before giving up; 0 refuses at once."""


CAPTION_FIELDS = ("caption", "tags", "class_tokens")


class BalanceParams(Section):
    SECTION: ClassVar[str] = "balance"

    caption_template: str = "{caption}, {tags}"
    """How an image's training caption is built from {caption} (sidecar, yaml or model caption), {tags}
    (yaml and tagger tags) and {class_tokens}. Repeated comma-separated parts are dropped; an empty
    result falls back to the class tokens."""

    caption_prefix: str = ""
    """Put before every caption, e.g. a trigger word."""

    caption_suffix: str = ""
    """Put after every caption."""

    reg_mode: Literal["kohya", "ratio", "none"] = "kohya"
    """How many times regularisation images train per epoch. `kohya`: reg repeats are raised in turn
    until they equal the train images' total repeats, as kohya's DreamBooth does; `ratio`: until they
    equal reg_ratio x that total; `none`: each reg image at its own folder repeats."""

    reg_ratio: float = Field(1.0, ge=0)
    """For reg_mode `ratio`: reg samples per epoch as a fraction of train samples."""

    prior_loss_weight: float = Field(1.0, ge=0)
    """Loss weight of regularisation samples (kohya `prior_loss_weight`); train samples weigh 1."""

    @field_validator("caption_template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        import string

        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        unknown = [name for name in names if name not in CAPTION_FIELDS]
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}}; use {', '.join('{' + f + '}' for f in CAPTION_FIELDS)}")
        return value


class SamplePrompt(CheckedModel):
    """One sample image drawn during training."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    prompt: str
    """The text to draw."""

    negative_prompt: str = ""
    """What to steer away from."""

    seed: int = 0
    """Noise seed: the same prompt and seed at every sampling point show how training changes it."""

    steps: int = Field(20, ge=1)
    """Sampler steps."""

    cfg: float = Field(7.0, ge=0)
    """Classifier-free guidance scale."""

    width: int = Field(512, ge=8, multiple_of=8)
    """Image width in pixels."""

    height: int = Field(512, ge=8, multiple_of=8)
    """Image height in pixels."""


# The Fourier-loss presets (train.fourier_config): each fills the fourier_* keys the user did not set.
FOURIER_PRESETS: dict[str, dict[str, Any]] = {
    "conservative": {"fourier_weight": 0.01, "fourier_mode": "basic", "fourier_norm": "l2", "fourier_high_freq_weight": 1.5, "fourier_warmup_steps": 500},
    "balanced": {"fourier_weight": 0.05, "fourier_mode": "weighted", "fourier_norm": "l2", "fourier_high_freq_weight": 2.0, "fourier_warmup_steps": 300},
    "aggressive": {"fourier_weight": 0.10, "fourier_mode": "multiscale", "fourier_norm": "l1", "fourier_scales": [1, 2, 4], "fourier_warmup_steps": 200},
    "super_resolution": {
        "fourier_weight": 0.08, "fourier_mode": "adaptive", "fourier_norm": "l2", "fourier_adaptive_max_weight": 3.0,
        "fourier_adaptive_min_weight": 1.0, "fourier_warmup_steps": 400,
    },
    "fine_detail": {"fourier_weight": 0.12, "fourier_mode": "weighted", "fourier_norm": "l1", "fourier_high_freq_weight": 2.5, "fourier_warmup_steps": 100},
}


# Settings tied to the DDPM schedule (its SNR, its discrete timesteps): refused under rectified flow, so
# that no key is silently ignored. The timestep ranges, the noise settings, masks and loss weights act in
# both objectives.
DIFFUSION_ONLY = ("use_log_norm_timesteps", "zero_terminal_snr", "loss_type", "min_snr_gamma", "debiased_estimation_loss")
# Settings only the rectified-flow objective reads.
FLOW_ONLY = ("reflow_steps", "reflow_gen_batches", "reflow_train_epochs", "reflow_sample_steps")


# A list of prompts, or a prompt file's path. Tagged by the value's type, so a bad list gets only the list's
# errors (an untagged union would also say "should be a valid string"); the tags leave the error's key.
PromptsOrFile = Annotated[
    Annotated[list[SamplePrompt], Tag("<list>")] | Annotated[str, Tag("<file>")],
    Discriminator(lambda value: "<file>" if isinstance(value, str) else "<list>"),
]

# kohya's `sample_sampler` choices; its `k_` names and A1111's spellings mean the same schedulers.
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle")
SAMPLER_ALIASES = {
    "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
    "euler a": "euler_a", "dpm++ 2m": "dpmsolver++", "dpm++_2m": "dpmsolver++", "dpmpp_2m": "dpmsolver++",
}


def sampler_name(value: Any) -> Any:
    """A sampler's name as SAMPLERS spells it, from kohya's `k_` names and A1111's ("DPM++ 2M") in any case."""
    if isinstance(value, str):
        name = value.strip().lower()
        return SAMPLER_ALIASES.get(name, name)
    return value


class TrainParams(Section):
    SECTION: ClassVar[str] = "train"

    learning_rate: float = Field(1e-4, gt=0, validation_alias=_aliases("learning_rate", "lr"))
    """Peak learning rate (kohya `learning_rate`; EveryDream2's `lr` is accepted as an alias)."""

    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE, validation_alias=_aliases("batch_size", "train_batch_size"))
    """Images per optimizer micro-step; every batch comes from one bucket (kohya `train_batch_size`)."""

    seed: int = Field(42, ge=-1)
    """Seed for noise, timesteps, the epoch order and every per-sample draw; -1 picks one at random
    (logged, and written to the LoRA metadata and checkpoints so a resume keeps it)."""

    bucket_remainder: Literal["fill", "drop", "partial"] = "fill"
    """A bucket's last, short batch: `fill` tops it up with random images of the same bucket (as
    EveryDream2 does), `drop` skips it, `partial` trains it short."""

    write_schedule: bool = False
    """Write each epoch's batches (bucket, image ids) to the run's logs folder (EveryDream2)."""

    latent_sampling: Literal["sample", "mean"] = "sample"
    """`sample`: draw a fresh latent from the cached mean and std every step; `mean`: use the mean."""

    flip_p: float = Field(0.0, ge=0, le=1)
    """Chance of training the horizontally flipped latent; an image's yaml flip_p overrides it. Needs
    flipped latents in the cache (cache.flip_latents)."""

    cond_dropout: float = Field(0.04, ge=0, le=1, validation_alias=_aliases("cond_dropout", "caption_dropout_rate"))
    """Chance of training with an empty caption (EveryDream2 `cond_dropout`, default 0.04; kohya
    `caption_dropout_rate`). The empty caption is encoded as the model's pipeline encodes an empty
    prompt: tokens for SD 1.x/2.x, zeros for SDXL (its force_zeros_for_empty_prompt)."""

    shuffle_tags: bool = Field(False, validation_alias=_aliases("shuffle_tags", "shuffle_caption"))
    """Shuffle the comma-separated parts of the caption after the first keep_tags (EveryDream2
    `shuffle_tags`, kohya `shuffle_caption`)."""

    keep_tags: int = Field(0, ge=0, validation_alias=_aliases("keep_tags", "keep_tokens"))
    """Leading caption parts that never move or drop (EveryDream2 `keep_tags`, kohya `keep_tokens`)."""

    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    """Chance of dropping each caption part after the kept ones (kohya)."""

    minibatch_repeat: int = Field(1, ge=1)
    """Repeat each sample this many times within its batch, each copy with its own noise and timestep
    (sd-trainer)."""

    workers: int = Field(2, ge=0, validation_alias=_aliases("workers", "max_data_loader_n_workers"))
    """DataLoader worker processes reading latents (kohya `max_data_loader_n_workers`); 0 reads in the
    training process."""

    output_name: str = Field("kiln", validation_alias=_aliases("output_name", "project_name"))
    """Name of the run: its files go to models/<output_name>/ (kohya `output_name`)."""

    mode: Literal["lora", "full"] = "lora"
    """What is trained: `lora`, a kohya-format LoRA on the UNet (and optionally the text encoders), or
    `full`, the UNet's own weights (and optionally the text encoders'), saved as a diffusers folder."""

    up_blocks_only: bool = False
    """Full fine-tune: train only the UNet's up_blocks, which saves backward compute (sd-trainer)."""

    train_text_encoder: bool = False
    """Full fine-tune: also train the text encoder(s), at text_encoder_lr."""

    network_dim: int = Field(16, ge=1)
    """LoRA rank (kohya `network_dim`)."""

    network_alpha: float = Field(8.0, gt=0)
    """LoRA alpha; the strength is alpha / dim, as in kohya."""

    network_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA's input (kohya `network_dropout`)."""

    save_diffusers_lora: bool = False
    """Also write the LoRA in diffusers' format, to models/<name>/diffusers_lora/."""

    conv_dim: int | None = Field(None, ge=1)
    """Also train the ResNet and up/down-sampling convolutions at this rank (LoCon, kohya `conv_dim`)."""

    conv_alpha: float | None = Field(None, gt=0)
    """Alpha of the convolution layers (kohya `conv_alpha`); defaults to conv_dim."""

    network_train_ff: bool = False
    """Also train the transformer blocks' feed-forward layers."""

    network_train_text_encoder: bool = False
    """Also train LoRA on the text encoder(s)."""

    text_encoder_lr: float | None = Field(None, gt=0)
    """Learning rate of the text encoder's LoRA; defaults to learning_rate."""

    optimizer: Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor", "sgd", "adacoor"] = Field(
        "adamw", validation_alias=_aliases("optimizer", "optimizer_type")
    )
    """The optimizer (kohya `optimizer_type`, whose CamelCase names such as `AdamW8bit` are accepted in any
    case); adacoor is EveryDream2's learning-rate-free optimizer."""

    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the optimizer, e.g. {weight_decay: 0.01, betas: [0.9, 0.99]}."""

    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    """Learning-rate schedule (kohya and EveryDream2 names)."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from 0 to the learning rate."""

    lr_decay_steps: int | None = Field(None, ge=1)
    """Length of the decay; for cosine it defaults to 1.2 x the total steps, so the lr never reaches 0
    (EveryDream2)."""

    scale_lr: bool = False
    """Scale every learning rate by (batch_size x grad_accum) ** 0.55 (EveryDream2)."""

    grad_accum: int = Field(1, ge=1, validation_alias=_aliases("grad_accum", "gradient_accumulation_steps"))
    """Micro-batches per optimizer step (kohya `gradient_accumulation_steps`)."""

    clip_grad_norm: float | None = Field(1.0, gt=0, validation_alias=_aliases("clip_grad_norm", "max_grad_norm"))
    """Clip the gradient norm to this (kohya `max_grad_norm`); null turns clipping off."""

    max_nonfinite_steps: int = Field(5, ge=1)
    """Steps in a row whose loss is NaN or inf before training stops with an error (each one is skipped:
    no weights change, and it is counted); the last checkpoint is kept."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision through accelerate."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    allow_tf32: bool = True
    """On an NVIDIA GPU, let the float32 matmuls and convolutions left under mixed precision (or all of
    them without it) use TF32 tensor cores (diffusers' `--allow_tf32`): several times faster, with 10-bit
    products. Off for bit-exact float32 arithmetic. No effect on the CPU."""

    compile_unet: bool = False
    """Compile the UNet's transformer and ResNet blocks with torch.compile, one block at a time (the same
    shapes share one compiled kernel set, so compiling takes about a minute, not ten; torch keeps the result
    in its cache for the next run). Faster steps on a GPU; the first step waits for the compile."""

    attn_type: Literal["sdp", "xformers", "slice"] = "sdp"
    """UNet attention: torch's scaled_dot_product_attention (default), xformers (when installed), or
    sliced attention (least memory, slowest)."""

    max_train_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (takes precedence over max_epochs)."""

    max_epochs: int = Field(1, ge=1, validation_alias=_aliases("max_epochs", "max_train_epochs"))
    """Epochs to train when max_train_steps is not set (kohya `max_train_epochs`)."""

    save_every_n_steps: int | None = Field(None, ge=1)
    """Save a resumable checkpoint every this many optimizer steps."""

    save_every_n_epochs: int | None = Field(None, ge=1)
    """Save a resumable checkpoint every this many epochs."""

    save_every_n_minutes: float | None = Field(None, gt=0, validation_alias=_aliases("save_every_n_minutes", "ckpt_every_n_minutes"))
    """Also save a resumable checkpoint when this many minutes have passed since the run (or its resume)
    started or since the last save (EveryDream2's `ckpt_every_n_minutes`): for machines that may vanish."""

    save_last_n: int = Field(2, ge=1)
    """Keep this many periodic checkpoints (the `interrupted` one is always kept)."""

    min_timestep: int = Field(0, ge=0, le=1000, validation_alias=_aliases("min_timestep", "timestep_start"))
    """Lowest training timestep, inclusive (kohya `min_timestep`, EveryDream2 `timestep_start`)."""

    max_timestep: int = Field(1000, ge=0, le=1000, validation_alias=_aliases("max_timestep", "timestep_end"))
    """Highest training timestep, exclusive; equal to min_timestep means that one timestep."""

    reg_min_timestep: int | None = Field(None, ge=0, le=1000)
    """Lowest timestep for regularisation images, inclusive; unset, the train range's min_timestep."""

    reg_max_timestep: int | None = Field(None, ge=0, le=1000)
    """Highest timestep for regularisation images, exclusive; unset, the train range's max_timestep."""

    use_log_norm_timesteps: bool = False
    """Draw timesteps as round(250·s) with s ~ LogNormal(μ, 1), μ = 0.65 × step / max_train_steps (0.65
    when the total is unknown), within each sample's range (meant for the l2 loss)."""

    masked_loss: bool = False
    """Weight the loss by each image's cached mask, normalised so the masked mean keeps the unmasked
    scale (sd-trainer's masked score estimation); images without a mask weigh 1 everywhere."""

    # --- noise ------------------------------------------------------------------------------------
    noise_offset: float = Field(0.0, ge=0, validation_alias=_aliases("noise_offset", "zero_frequency_noise_ratio"))
    """Add a per-sample, per-channel constant N(0, 1) × noise_offset to the noise, so the model learns
    overall brightness (kohya `noise_offset`; EveryDream2's `zero_frequency_noise_ratio` is an alias)."""

    noise_offset_random_strength: bool = False
    """Scale noise_offset by a uniform draw in [0, 1) each step (kohya)."""

    adaptive_noise_scale: float | None = None
    """Add adaptive_noise_scale × |mean of each latent channel| to noise_offset (kohya; clamped at 0)."""

    multires_noise_iterations: int = Field(0, ge=0)
    """Pyramid (multi-resolution) noise: add this many upsampled lower-resolution noise levels (kohya
    `multires_noise_iterations`; 6 to 10 is usual). 0 is off."""

    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    """Weight of each coarser level: discount ** level (kohya `multires_noise_discount`)."""

    pyramid_noise_discount: float | None = Field(None, gt=0, le=1)
    """EveryDream2's pyramid noise: this discount with 10 levels (or multires_noise_iterations if set)."""

    ip_noise_gamma: float = Field(0.0, ge=0)
    """Input-perturbation noise (Ning et al. 2023): the model sees noise + γ·ξ while the target keeps
    the plain noise (kohya `ip_noise_gamma`)."""

    ip_noise_gamma_random_strength: bool = False
    """Scale ip_noise_gamma by a uniform draw in [0, 1) each step (kohya)."""

    zero_terminal_snr: bool = Field(False, validation_alias=_aliases("zero_terminal_snr", "enable_zero_terminal_snr"))
    """Rescale the betas so the last timestep has zero SNR (Lin et al. 2023); meant for v-prediction
    (a warning otherwise). EveryDream2 `enable_zero_terminal_snr`."""

    # --- loss -------------------------------------------------------------------------------------
    loss_type: Literal["mse", "l2", "l1", "huber", "smooth_l1", "mse_huber", "huber_mse", "fourier"] = "mse"
    """mse (alias l2), l1, huber and smooth_l1 (kohya, with huber_c and huber_schedule), EveryDream2's
    mse_huber (MSE at timestep 0 to Huber at 999) and huber_mse (the reverse), or fourier (the
    fourier_norm base loss plus a frequency-domain term)."""

    huber_c: float = Field(0.1, gt=0, le=1)
    """The Huber threshold (kohya `huber_c`); the base value of huber_schedule."""

    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    """How huber_c varies with the timestep (kohya): constant; exponential, exp(−ln(1/c)·t/T) from 1 at
    t = 0 to c at T; snr, (1 − c)/(1 + σ_t)² + c."""

    fourier_config: Literal["conservative", "balanced", "aggressive", "super_resolution", "fine_detail"] | None = None
    """A preset that fills the fourier_* keys; keys set explicitly override it."""

    fourier_weight: float = Field(0.05, ge=0)
    """Weight w of the frequency-domain term: loss = base + w·F."""

    fourier_mode: Literal["basic", "weighted", "multiscale", "adaptive"] = "weighted"
    """basic: F on the magnitude spectra; weighted: high frequencies weigh up to fourier_high_freq_weight;
    multiscale: F averaged over fourier_scales; adaptive: weighted, with the weight falling from
    fourier_adaptive_max_weight to fourier_adaptive_min_weight over training."""

    fourier_norm: Literal["l1", "l2"] = "l2"
    """The base loss (l2: MSE, l1: L1) and the distance between the spectra."""

    fourier_high_freq_weight: float = Field(2.0, gt=0)
    """Weight of the highest frequencies in the weighted mode (clamped to [1, 3])."""

    fourier_scales: list[int] = Field(default_factory=lambda: [1, 2, 4])
    """Average-pooling factors of the multiscale mode."""

    fourier_scale_weights: list[float] | None = None
    """Weights of fourier_scales (default 1/scale)."""

    fourier_warmup_steps: int = Field(300, ge=0)
    """The frequency term is zero before this step."""

    fourier_adaptive_max_weight: float = Field(3.0, gt=0)
    """The adaptive mode's high-frequency weight at the start of training."""

    fourier_adaptive_min_weight: float = Field(1.0, gt=0)
    """The adaptive mode's high-frequency weight at the end of training."""

    min_snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR weighting (Hang et al. 2023): each sample's loss × min(SNR, γ)/SNR, or min(SNR, γ)/(SNR + 1)
    for v-prediction. 5 is the paper's value."""

    debiased_estimation_loss: bool = False
    """Weight each sample's loss by 1/√SNR (1/(SNR + 1) for v-prediction), kohya's debiased estimation."""

    # --- conditioning ------------------------------------------------------------------------------
    embedding_perturbation: float = Field(0.0, ge=0)
    """Add Gaussian noise with std γ/√d to the text encoder's output (d its width; arXiv 2405.20494)."""

    clip_skip: int = Field(1, ge=1, le=4)
    """Text-encoder layer to use, counted from the end: 1 the last, 2 the penultimate with the final
    layer norm applied as A1111 does. SD 2.x and SDXL count back from the layer diffusers already uses."""

    cache_text_encoder_outputs: bool = False
    """Encode each caption once and keep the frozen text encoders' output on the CPU (kohya's
    `cache_text_encoder_outputs`), instead of running the encoders every step; the result is the same up
    to float rounding, and a resumed run is still exact. Needs frozen encoders (no train_text_encoder /
    network_train_text_encoder), and fixed texts: not with shuffle_tags or caption_tag_dropout_rate, which
    make a new text nearly every step (kohya refuses them too). cond_dropout's empty caption is cached."""

    # --- EMA -------------------------------------------------------------------------------------
    ema_decay_rate: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the trained weights with this decay (EveryDream2); unset is off."""

    ema_strength_target: float | None = Field(None, gt=0, lt=1)
    """Compute ema_decay_rate from decay^(total_steps / ema_update_interval) = target (EveryDream2)."""

    ema_update_interval: int = Field(500, ge=1)
    """Update the EMA every this many optimizer steps (EveryDream2)."""

    ema_device: Literal["cpu", "cuda"] = "cpu"
    """Where the EMA weights live: cpu saves GPU memory; cuda is faster."""

    ema_resume_model: str | None = None
    """EMA weights to start from (a `<name>_ema.safetensors` Kiln wrote); `--resume` restores them anyway."""

    ema_sample_ema_model: bool | None = None
    """Draw the sample prompts with the EMA weights (default when EMA is on)."""

    ema_sample_nonema_model: bool | None = None
    """Draw the sample prompts with the trained (non-EMA) weights (default only when EMA is off)."""

    # --- rectified flow ------------------------------------------------------------------------------
    rectified_flow: bool = False
    """Train with the rectified-flow objective (EveryDream2): x_t = t·x1 + (1 − t)·x0, predict x1 − x0.
    Needs a v-prediction base."""

    reflow_steps: int = Field(0, ge=0)
    """Reflow iterations before the main epochs: generate (noise, ODE solution) pairs with the model and
    train on them, which straightens its trajectories. Needs rectified_flow."""

    reflow_gen_batches: int = Field(4, ge=1)
    """Batches of the dataset each reflow iteration generates pairs from."""

    reflow_train_epochs: int = Field(1, ge=1)
    """Epochs over the generated pairs in each reflow iteration."""

    reflow_sample_steps: int | None = Field(None, ge=1)
    """Euler steps of each reflow ODE solve; unset, 50."""

    sample_prompts: PromptsOrFile = Field(default_factory=list)
    """Images to draw while training: a list of {prompt, negative_prompt, seed, steps, cfg, width, height},
    or a prompt file: kohya's `.txt` (one prompt a line, with `--n --w --h --d --l --s`), EveryDream2's
    `sample_prompts.txt` or `.json`, or a `.yaml` list. A relative path is relative to the project."""

    sample_sampler: Literal[SAMPLERS] = "euler"
    """The sampler that draws them (kohya `sample_sampler`): ddim, pndm, lms, euler, euler_a, heun, dpm_2,
    dpm_2_a, dpmsolver, dpmsolver++ (A1111's `DPM++ 2M`), dpmsingle; kohya's `k_` names are accepted."""

    sample_every_n_steps: int | None = Field(None, ge=1, validation_alias=_aliases("sample_every_n_steps", "sample_steps"))
    """Draw the sample prompts every this many optimizer steps (kohya `sample_every_n_steps`). EveryDream2's
    `sample_steps` is accepted as an alias with EveryDream2's meaning, this interval; the number of sampler
    steps per image is each prompt's `steps` (kohya's `--s`)."""

    sample_every_n_epochs: int | None = Field(None, ge=1)
    """Draw the sample prompts every this many epochs."""

    validation_split: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of the train images (chosen by image_id, stable as images are added) for a
    validation loss with fixed noise and timesteps (EveryDream2's stabilised validation)."""

    validation_folder: str | None = None
    """A folder of the data source (for example `val` or `train/1_val`) whose images are the validation
    set: scanned and cached with the rest, never trained on (EveryDream2's `val_data_root`). Used
    together with validation_split when both are set."""

    validate_every: int | None = Field(None, ge=1)
    """Compute the validation loss every this many steps (and at the end); needs validation_split or
    validation_folder."""

    save_precision: Literal["float", "fp16", "bf16"] = "fp16"
    """The dtype of the saved weights in the LoRA and the full fine-tune's single-file checkpoint (kohya
    `save_precision`); the diffusers folder keeps the training dtype."""

    load_settings_every_epoch: bool = False
    """Re-read params.yaml at each epoch start and apply the keys EveryDream2 lets change mid-run
    (save_every_n_epochs, zero_frequency_noise_ratio / noise_offset, min_snr_gamma, clip_skip); any
    other changed key is refused with a warning."""

    log_timesteps: bool = False
    """Also write every sampled (global_step, image_id, is_reg, timestep) to logs/timesteps.parquet."""

    log_step: int = Field(10, ge=1)
    """Write TensorBoard and dvclive logs every this many steps (EveryDream2 `log_step`)."""

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # It becomes models/<output_name>/<output_name>.safetensors: a path in it would write elsewhere.
        if not value or value.startswith(".") or any(char in value for char in "/\\\0"):
            raise ValueError("must be a plain folder name: not empty, no / or \\, not starting with '.'")
        return value

    @field_validator("optimizer", "lr_scheduler", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        # kohya writes `AdamW8bit`, `Prodigy`, `Lion`; EveryDream2 `adamw8bit`: one name whatever the case.
        return value.lower() if isinstance(value, str) else value

    @field_validator("sample_sampler", mode="before")
    @classmethod
    def _sampler_name(cls, value: Any) -> Any:
        return sampler_name(value)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 readers (PyYAML) turn an unquoted `no` into False; DVC writes params.yaml unquoted.
        return "no" if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _fourier_preset(cls, data: Any) -> Any:
        # A preset fills the fourier_* keys the user did not set.
        if isinstance(data, dict) and isinstance(data.get("fourier_config"), str) and data["fourier_config"] in FOURIER_PRESETS:
            data = {**FOURIER_PRESETS[data["fourier_config"]], **data}
        return data

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainParams:
        if self.min_timestep > self.max_timestep:
            raise ParamsError(
                f"train.min_timestep: must be ≤ train.max_timestep (got {self.min_timestep} > {self.max_timestep})"
            )
        low, high = self.reg_timestep_range
        if low > high:
            raise ParamsError(
                f"train.reg_min_timestep: must be ≤ train.reg_max_timestep (got {low} > {high}; an unset one takes "
                "the train range's value)"
            )
        if any(scale < 1 for scale in self.fourier_scales) or not self.fourier_scales:
            raise ParamsError(f"train.fourier_scales: must be one or more integers ≥ 1 (got {self.fourier_scales})")
        if self.fourier_scale_weights is not None and len(self.fourier_scale_weights) != len(self.fourier_scales):
            raise ParamsError(
                f"train.fourier_scale_weights: needs one weight per scale in fourier_scales {self.fourier_scales} "
                f"(got {len(self.fourier_scale_weights)})"
            )
        if self.reflow_steps and not self.rectified_flow:
            raise ParamsError("train.reflow_steps: reflow trains with the rectified-flow objective; set train.rectified_flow: true")
        if self.rectified_flow:
            for key in DIFFUSION_ONLY:
                if getattr(self, key) != TrainParams.model_fields[key].default and not (key == "loss_type" and self.loss_type == "l2"):
                    raise ParamsError(
                        f"train.{key}: belongs to the diffusion schedule and has no meaning under train.rectified_flow "
                        f"(got {getattr(self, key)!r}); unset it, or turn rectified_flow off"
                    )
        if self.cache_text_encoder_outputs and self.text_encoder_trains:
            raise ParamsError(
                "train.cache_text_encoder_outputs: the text encoder trains in this run (train_text_encoder / "
                "network_train_text_encoder), so its outputs change every step and cannot be cached"
            )
        if self.cache_text_encoder_outputs and (self.shuffle_tags or self.caption_tag_dropout_rate):
            raise ParamsError(
                "train.cache_text_encoder_outputs: shuffle_tags and caption_tag_dropout_rate make a new caption text "
                "nearly every step, which no cache can hold; turn them off or the cache off"
            )
        if self.ema_strength_target is not None and self.ema_decay_rate is not None:
            raise ParamsError("train.ema_strength_target: set it or ema_decay_rate, not both (the target computes the rate)")
        return self

    @property
    def text_encoder_trains(self) -> bool:
        return self.train_text_encoder if self.mode == "full" else self.network_train_text_encoder

    @property
    def reg_timestep_range(self) -> tuple[int, int]:
        """[low, high) for regularisation images: their own keys, each defaulting to the train range's."""
        low = self.min_timestep if self.reg_min_timestep is None else self.reg_min_timestep
        high = self.max_timestep if self.reg_max_timestep is None else self.reg_max_timestep
        return low, high

    @property
    def ema_enabled(self) -> bool:
        return self.ema_decay_rate is not None or self.ema_strength_target is not None


class Params(BaseModel):
    """All of params.yaml. A missing section takes its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelParams = Field(default_factory=ModelParams)
    scan: ScanParams = Field(default_factory=ScanParams)
    caption: CaptionParams = Field(default_factory=CaptionParams)
    tag: TagParams = Field(default_factory=TagParams)
    bucket: BucketParams = Field(default_factory=BucketParams)
    cache: CacheParams = Field(default_factory=CacheParams)
    balance: BalanceParams = Field(default_factory=BalanceParams)
    train: TrainParams = Field(default_factory=TrainParams)


def sections() -> dict[str, type[Section]]:
    return {name: field.annotation for name, field in Params.model_fields.items()}


def _valid_keys(section: str) -> list[str]:
    model = sections()[section]
    return [key for name, field in model.model_fields.items() for key in field_names(name, field)]


def suggestion(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(choices)}"


def one_line(text: str) -> str:
    """Escape line breaks and other unprintable characters (a key may hold any), so a problem stays one line."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in text)


def clipped(text: str) -> str:
    return text if len(text) <= 60 else f"{text[:57]}..."


UNION_TAGS = {"<list>", "<file>"}


def _key_path(loc: Sequence[Any]) -> list[str]:
    """pydantic's error location as the user's key path: a tagged union's tag ("<list>") right after the
    field it belongs to is no key."""
    parts = [str(part) for part in loc]
    return [part for index, part in enumerate(parts) if not (index and part in UNION_TAGS and parts[index - 1] == "sample_prompts")]


def _format_error(error: dict[str, Any], source: str) -> str:
    loc = _key_path(error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f"{source}: unknown section '{loc[0]}'{suggestion(loc[0], list(sections()))}"
        section, name = loc[0], loc[-1]
        if len(loc) == 2 and section in sections():
            # kohya and EveryDream2 keep every option in one namespace: `resolution` set under train is
            # bucket's. The closest spelling in any section wins, this section's on a tie.
            scored = [
                (difflib.SequenceMatcher(None, name, choice).ratio(), other == section, other, choice)
                for other in sections() for choice in _valid_keys(other)
            ]
            ratio, _, other, choice = max(scored)
            if other != section and ratio >= 0.8:
                problem = f"not a {section} key" if ratio == 1 else f"unknown key in section '{section}'"
                return f"{source}: {key}: {problem}; did you mean {other}.{choice}?"
        return f"{source}: {key}: unknown key in section '{section}'{suggestion(name, _valid_keys(section))}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "int_parsing_size":  # pydantic's wording speaks of strings, whatever the input
        message = INT64_MESSAGE
    if error["type"] == "model_type" or error["type"] == "dict_type":
        return f"{source}: {key}: must be a mapping of keys to values (got {clipped(repr(error['input']))})"
    return f"{source}: {key}: {message} (got {clipped(repr(error['input']))})"


def _origin(loc: tuple[str, ...], source: str, lines: Mapping[tuple[str, ...], int], overrides: Mapping[tuple[str, ...], str]) -> str:
    """Where the value at `loc` was set: the --set that set it, else the file, at its key's line when known."""
    if not loc:
        return source
    for path, override in overrides.items():
        if loc[: len(path)] == path or path[: len(loc)] == loc:
            return f"--set {override}"
    # The nearest enclosing key in the file, but a section's line only for a problem with the section.
    for end in range(len(loc), min(len(loc), 2) - 1, -1):
        if loc[:end] in lines:
            return f"{source}:{lines[loc[:end]]}"
    return source


def parse_override(override: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001). The value is read as YAML, as `dvc exp run -S` does."""
    key, sep, value = override.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ParamsError(f"--set {one_line(override)}: expected section.key=value, for example --set train.lr=1e-4")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {one_line(override)}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return path, parsed


def _apply_override(raw: dict[str, Any], path: list[str], value: Any, override: str) -> list[tuple[str, ...]]:
    """Set the value; returns the key paths it decides, every spelling of the key included."""
    decided = [tuple(path)]
    section = raw.get(path[0])
    if len(path) == 2 and path[0] in sections() and isinstance(section, dict):
        # `--set train.lr=...` replaces the file's `learning_rate`: an override wins over any spelling.
        for name, field in sections()[path[0]].model_fields.items():
            spellings = field_names(name, field)
            if path[1] in spellings:
                for spelling in spellings:
                    section.pop(spelling, None)
                decided = [(path[0], spelling) for spelling in spellings]
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {one_line(override)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value
    return decided


def validate_params(
    raw: Any, source: str = "params.yaml", lines: Mapping[tuple[str, ...], int] | None = None,
    overrides: Mapping[tuple[str, ...], str] | None = None,
) -> Params:
    """Validate a parsed params mapping; raise ParamsError with one line per problem, each naming its key
    and where it was set: `source:line` (`lines` maps key paths to lines) or the `--set` (`overrides`
    maps the key paths it set to its text)."""
    lines, overrides = lines or {}, overrides or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: must be a mapping of sections (got {type(raw).__name__})")
    token = _READS.set(None)  # the cross-field checks read every key of their section: not a stage's read
    try:
        return Params.model_validate(raw)
    except ParamsError as exc:
        # Raised by a cross-field check; its message starts with the key it blames.
        named = re.match(r"(\w+(?:\.\w+)+): ", str(exc))
        origin = _origin(tuple(named.group(1).split(".")) if named else (), source, lines, overrides)
        raise ParamsError(one_line(f"{origin}: {exc}")) from None
    except ValidationError as exc:
        problems = [
            one_line(_format_error(error, _origin(tuple(_key_path(error["loc"])), source, lines, overrides)))
            for error in exc.errors()
        ]
        raise ParamsError("\n".join(problems)) from None
    finally:
        _READS.reset(token)


def declared_values(params: Params, names: Sequence[str]) -> dict[str, Any]:
    """The values of `names`, each a section ("train") or one key ("bucket.resolution"), as JSON data:
    what a stage declares in dvc.yaml, and so what its outputs may depend on."""
    dumped = params.model_dump(mode="json")
    values = {}
    for name in names:
        section, _, key = name.partition(".")
        values[name] = dumped[section][key] if key else dumped[section]
    return values


def load_params(path: Path | str = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read params.yaml, apply `--set section.key=value` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root, or pass --params)")
    raw, lines = read_yaml(path)
    if raw is None:
        raw = {}  # an empty file (or only comments): every default
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections (got {type(raw).__name__})")
    overridden: dict[tuple[str, ...], str] = {}
    for override in overrides:
        key_path, value = parse_override(override)
        for decided in _apply_override(raw, key_path, value, override):
            overridden[decided] = one_line(clipped(override))
    return validate_params(raw, source=str(path), lines=lines, overrides=overridden)


# libyaml when PyYAML was built with it: the same documents, parsed ten times faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The file's data, and the line of every key in it (list items by index), for error messages."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParamsError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return (None, {}) if node is None else (loader.construct_document(node), _key_lines(node))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if mark is not None:
            line = mark.line + 1
        else:  # a ReaderError (a character YAML forbids) has only its position
            line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(one_line(f"{path}:{line}: not valid YAML: {problem}")) from None
    finally:
        loader.dispose()


def _key_lines(root: yaml.Node) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[tuple[str, ...], yaml.Node]] = [((), root)]
    seen = set()
    while stack:
        path, node = stack.pop()
        if id(node) in seen:  # an alias: its keys' lines are those under its anchor
            continue
        seen.add(id(node))
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [(key.value, key.start_mark.line, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)]
        elif isinstance(node, yaml.SequenceNode):
            children = [(str(index), item.start_mark.line, item) for index, item in enumerate(node.value)]
        for name, line, child in children:
            lines[(*path, name)] = line + 1
            stack.append(((*path, name), child))
    return lines


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(arg) for arg in get_args(annotation))
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("pipeline.params.", "")


def explain() -> Iterator[str]:
    """Lines documenting every section and field: name, type, default, aliases and docstring."""
    for section, model in sections().items():
        yield f"[{section}]"
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            aliases = field_names(name, field)[1:]
            alias_text = f" (alias: {', '.join(aliases)})" if aliases else ""
            annotation = _type_name(field.annotation)
            yield f"  {section}.{name}: {annotation} = {default!r}{alias_text}"
            for line in (field.description or "").split("\n"):
                yield f"      {line.strip()}"
        yield ""
