"""The synthetic demo dataset: procedurally drawn shapes, deterministic to the byte.

It exercises what real datasets contain: kohya concept folders with repeats, a reg folder, square,
portrait, landscape and 4:1 images from 300 to 1600 px, `.txt` sidecars, EveryDream2 `.yaml` sidecars,
a `local.yaml`, a `batch_id.txt`, an EXIF-rotated JPEG, an image with an alpha channel and a
`-masklabel.png` mask.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import KilnError

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 70),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


@dataclass(frozen=True)
class DemoImage:
    rel: str
    shape: str
    size: tuple[int, int]
    colour: str
    background: tuple[str, str]
    caption: str | None = None
    yaml: str | None = None
    alpha: bool = False
    jpeg_orientation: int | None = None


CIRCLE = "train/10_sks circle"
SQUARE = "train/5_sks square"
REG = "reg/1_shape"

IMAGES = [
    DemoImage(f"{CIRCLE}/circle_01.png", "circle", (512, 512), "red", ("blue", "white"), caption="a sks circle, red, on a blue gradient"),
    DemoImage(f"{CIRCLE}/circle_02.png", "circle", (640, 960), "yellow", ("purple", "black"), caption="a sks circle, yellow, portrait"),
    DemoImage(f"{CIRCLE}/circle_03.png", "circle", (1200, 800), "green", ("white", "orange")),
    DemoImage(f"{CIRCLE}/circle_04.png", "circle", (1600, 400), "blue", ("yellow", "white"), caption="a sks circle in a wide banner"),
    DemoImage(
        f"{CIRCLE}/circle_05.png", "circle", (768, 768), "purple", ("green", "white"),
        yaml="main_prompt: a sks circle, purple\ntags:\n  - tag: flat colour\n    weight: 1.5\n  - tag: gradient\nflip_p: 0.5\n",
    ),
    DemoImage(f"{CIRCLE}/circle_06.png", "circle", (300, 300), "orange", ("blue", "black")),
    DemoImage(f"{CIRCLE}/circle_07.png", "circle", (900, 1350), "white", ("red", "black"), caption="a sks circle, white on red"),
    DemoImage(f"{CIRCLE}/circle_08.png", "circle", (640, 640), "red", ("white", "white"), alpha=True, caption="a sks circle, transparent background"),
    DemoImage(f"{SQUARE}/square_01.png", "square", (512, 512), "blue", ("orange", "white"), caption="a sks square, blue"),
    DemoImage(f"{SQUARE}/square_02.jpg", "square", (1024, 768), "green", ("purple", "white"), jpeg_orientation=6),
    DemoImage(f"{SQUARE}/square_03.png", "square", (400, 1600), "red", ("yellow", "black"), caption="a sks square in a tall strip"),
    DemoImage(
        f"{SQUARE}/square_04.png", "square", (832, 1216), "yellow", ("blue", "black"),
        yaml="main_prompt: a sks square, yellow, portrait\nmultiply: 1.5\nloss_scale: 0.8\n",
    ),
    DemoImage(f"{SQUARE}/square_05.jpg", "square", (1344, 768), "purple", ("green", "black")),
    DemoImage(f"{SQUARE}/square_06.png", "square", (720, 720), "orange", ("white", "blue"), caption="a sks square, orange"),
    DemoImage(f"{REG}/shape_01.png", "triangle", (512, 512), "green", ("white", "white")),
    DemoImage(f"{REG}/shape_02.png", "circle", (768, 512), "blue", ("black", "purple")),
    DemoImage(f"{REG}/shape_03.png", "square", (512, 768), "red", ("white", "yellow")),
    DemoImage(f"{REG}/shape_04.png", "triangle", (1600, 400), "orange", ("blue", "white")),
    DemoImage(f"{REG}/shape_05.jpg", "circle", (960, 640), "yellow", ("green", "black")),
    DemoImage(f"{REG}/shape_06.png", "square", (640, 960), "purple", ("orange", "white"), caption="a shape, a purple square"),
    DemoImage(f"{REG}/shape_07.png", "triangle", (1024, 1024), "white", ("red", "blue")),
    DemoImage(f"{REG}/shape_08.png", "circle", (400, 400), "black", ("yellow", "orange")),
]

FOLDER_FILES = {
    # EveryDream2 folder metadata: applies to every image in the folder.
    f"{CIRCLE}/local.yaml": "cond_dropout: 0.1\nshuffle_tags: false\n",
    f"{SQUARE}/batch_id.txt": "squares\n",
}


# EveryDream2's mask convention: `<stem>-masklabel.png` beside the image, white where the loss counts.
MASKED = f"{CIRCLE}/circle_03.png"


def _mask(size: tuple[int, int]) -> bytes:
    mask = Image.new("L", size, 64)
    width, height = size
    ImageDraw.Draw(mask).ellipse((width // 6, height // 6, width * 5 // 6, height * 5 // 6), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient(size: tuple[int, int], start: str, end: str, horizontal: bool) -> np.ndarray:
    width, height = size
    steps = np.linspace(0.0, 1.0, width if horizontal else height, dtype=np.float32)
    ramp = steps[None, :, None] if horizontal else steps[:, None, None]
    a, b = np.array(COLOURS[start], np.float32), np.array(COLOURS[end], np.float32)
    return np.broadcast_to(a + (b - a) * ramp, (height, width, 3))


def draw(spec: DemoImage, seed: int) -> Image.Image:
    """One image: a gradient, seeded noise, and the shape in the middle third."""
    rng = np.random.default_rng(seed)
    width, height = spec.size
    pixels = _gradient(spec.size, *spec.background, horizontal=bool(seed % 2))
    pixels = pixels + rng.normal(0.0, 12.0, size=(height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if spec.alpha:
        image = image.convert("RGBA")
        image.putalpha(0)
    shape_draw = ImageDraw.Draw(image)
    radius = min(width, height) // 3
    jitter = rng.integers(-radius // 4, radius // 4 + 1, size=2)
    cx, cy = width // 2 + int(jitter[0]), height // 2 + int(jitter[1])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[spec.colour] + ((255,) if spec.alpha else ())
    if spec.shape == "circle":
        shape_draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        shape_draw.rectangle(box, fill=fill)
    else:
        shape_draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    return image


def encode(spec: DemoImage, image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    if spec.rel.endswith(".jpg"):
        exif = Image.Exif()
        if spec.jpeg_orientation:
            # Stored sideways with an EXIF rotation, as phone cameras do: scan must report the turned size.
            exif[0x0112] = spec.jpeg_orientation
            image = image.transpose(Image.Transpose.ROTATE_90)
        image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    # Unchanged files keep their mtime, so a re-scan reuses its probe cache.
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def foreign_files(out: Path, files: dict[str, bytes]) -> list[str]:
    """Files under out that the demo did not write: any other name, or a demo name with other bytes."""
    if not out.exists():
        return []
    found = sorted(path for path in out.rglob("*") if path.is_file() or path.is_symlink())
    return [
        path.relative_to(out).as_posix() for path in found
        if path.relative_to(out).as_posix() not in files or path.is_symlink()
        or path.read_bytes() != files[path.relative_to(out).as_posix()]
    ]


def write_demo_data(out: Path, seed: int = 0) -> dict[str, int]:
    """Write the demo dataset under out (data/raw); returns counts of files written and unchanged.

    Refuses, writing nothing, when out holds anything the demo did not write: a user who adds their own
    images to data/raw and reruns `make demo` must not find 22 synthetic images trained beside them.
    """
    written = unchanged = 0
    files: dict[str, bytes] = {}
    for index, spec in enumerate(IMAGES):
        files[spec.rel] = encode(spec, draw(spec, seed * 1000 + index))
        if spec.caption is not None:
            files[str(Path(spec.rel).with_suffix(".txt"))] = (spec.caption + "\n").encode()
        if spec.yaml is not None:
            files[str(Path(spec.rel).with_suffix(".yaml"))] = spec.yaml.encode()
    files.update({rel: text.encode() for rel, text in FOLDER_FILES.items()})
    files[MASKED.replace(".png", "-masklabel.png")] = _mask(next(s for s in IMAGES if s.rel == MASKED).size)
    foreign = foreign_files(out, files)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise KilnError(
            f"{out}: holds {len(foreign)} file(s) the demo did not write ({shown}); the demo writes only into an "
            "empty folder or its own earlier output. Train your own images with `dvc repro` (scan.data_root), or "
            "give the demo another folder with --out"
        )
    for rel, data in sorted(files.items()):
        if _write_if_changed(out / rel, data):
            written += 1
        else:
            unchanged += 1
    return {"images": len(IMAGES), "files_written": written, "files_unchanged": unchanged}
