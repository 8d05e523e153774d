"""Test helper: tiny ImageFolder trees of generated JPEGs (deterministic), for the folder datasets.

    root = write_image_folder(tmp_path / "imagenet")   # train/ and val/, 3 classes x 4 images of 40x48 pixels
    write_flat_val(root)                               # val/ as the raw ILSVRC archive leaves it (no class folders)

Each class has its own colour, plus per-pixel noise, so a small network can tell the classes apart.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("imagenet", "named")


def class_names(classes: int, layout: str = "imagenet") -> list[str]:
    """The class folder names `write_image_folder` uses, in label order (sorted, as ImageFolder sorts them)."""
    if layout == "imagenet":
        return [f"n{k:08d}" for k in range(classes)]  # WordNet-ID-like: n00000000, n00000001, ...
    if layout == "named":
        return [f"class_{k:03d}" for k in range(classes)]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def random_image(rng: np.random.Generator, size: tuple[int, int], colour: np.ndarray, mode: str = "RGB") -> Image.Image:
    """A (height, width) = `size` image: `colour` plus noise, in PIL `mode` ("RGB", "L" or "CMYK")."""
    pixels = colour + rng.normal(0, 40, (*size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def write_image_folder(
    root: Path,
    classes: int = 3,
    per_class: int = 4,
    size: tuple[int, int] = (40, 48),
    layout: str = "imagenet",
    *,
    val_per_class: int | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write `root/<split>/<class>/<name>.JPEG` for each split and class; return `root`.

    Args:
        root: folder to write into (created; existing files are kept).
        classes: number of class folders, named by `class_names(classes, layout)`.
        per_class: images per class of the first split (the training one), and of the others unless `val_per_class`.
        size: (height, width) of every image.
        layout: "imagenet" (wnid-like folders, files <wnid>_<i>.JPEG) or "named" (class_000 ..., files img_<i>.jpg).
        val_per_class: images per class of the other splits (default: `per_class`).
        splits: the split folders to write, training split first.
        seed: the content is a pure function of (seed, split, class, image).
    """
    names = class_names(classes, layout)
    colours = np.random.default_rng(seed).uniform(0, 255, (classes, 3))
    for s, split in enumerate(splits):
        count = per_class if s == 0 or val_per_class is None else val_per_class
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, s, k, i])
                file = f"{name}_{i}.JPEG" if layout == "imagenet" else f"img_{i}.jpg"
                random_image(rng, size, colours[k]).save(folder / file, quality=90)
    return root


def write_flat_val(root: Path, count: int = 6, size: tuple[int, int] = (40, 48), *, seed: int = 0) -> Path:
    """Replace `root/val` by `count` loose ILSVRC2012_val_*.JPEG files (the unsorted validation archive); return it."""
    val = root / "val"
    shutil.rmtree(val, ignore_errors=True)
    val.mkdir(parents=True)
    rng = np.random.default_rng([seed, 99])
    for i in range(count):
        random_image(rng, size, np.full(3, 128.0)).save(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)
    return val
