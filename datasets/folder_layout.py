"""The layout of folder datasets (torchvision's ImageFolder: one folder per class, class k the k-th folder name in
sorted order) and the checks that name what is wrong with one::

    <root>/train/<class>/*.JPEG     (any of torchvision's IMG_EXTENSIONS, in sub-folders too)
    <root>/val/<class>/*.JPEG

Only the file list is read when a split is built (os.scandir/os.walk, no image is opened), so a split of any size
costs a few bytes per file.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ctkd.errors import ConfigError
from ctkd.logging import get_logger

from .base import DatasetError, examples
from .folder import ImageFolderSource


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """torchvision's IMG_EXTENSIONS (imported on first use: torchvision takes seconds to import)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def _is_image(name: str) -> bool:
    """torchvision's ImageFolder test: the name ends with one of its IMG_EXTENSIONS, case-insensitively."""
    return name.lower().endswith(image_extensions())


@dataclass(frozen=True)
class Describe:
    """What the errors of one dataset say: its title, the expected layout and how to sort a flat folder."""

    title: str
    layout: str
    flat_fix: str


def _class_folders(split_dir: Path, split: str, describe: Describe) -> list[str]:
    """The sorted class folder names of a split (torchvision's find_classes), refusing loose images and no classes."""
    if not split_dir.is_dir():
        state = "is not a directory" if split_dir.exists() else "does not exist"
        raise DatasetError(f"{describe.title} {split} folder {split_dir} {state}.\n{describe.layout}")
    classes, loose = [], []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.is_dir():
                classes.append(entry.name)
            elif _is_image(entry.name):
                loose.append(entry.name)
    if loose and not classes:
        raise DatasetError(
            f"{describe.title} {split} folder {split_dir} holds {len(loose)} image(s) directly ({examples(loose)}) "
            f"and no class folders: the images must be sorted into one folder per class. {describe.flat_fix}\n"
            f"{describe.layout}"
        )
    if loose:
        raise DatasetError(
            f"{describe.title} {split} folder {split_dir} holds {len(loose)} image(s) outside its {len(classes)} "
            f"class folders ({examples(loose)}); they would be ignored. Move each into its class folder (an "
            f"interrupted sorting?) or delete them.\n{describe.layout}"
        )
    if not classes:
        raise DatasetError(f"{describe.title} {split} folder {split_dir} holds no class folders.\n{describe.layout}")
    return sorted(classes)


_WARNED_NON_IMAGES: set[str] = set()  # split folders whose non-image files were reported (once per process)


def _has_image(folder: Path) -> bool:
    """Whether `folder` (or a folder below it) holds an image file; stops at the first one."""
    return any(_is_image(f) for _, _, names in os.walk(folder, followlinks=True) for f in names)


def _list_files(
    split_dir: Path, classes: Sequence[str], split: str, describe: Describe, others: Sequence[tuple[str, Path]] = ()
) -> tuple[list[str], Tensor]:
    """Image paths relative to `split_dir` and their labels, in torchvision ImageFolder's order (no image opened).

    Files that are not images are left out, and said so once; an empty class folder is an error naming it, with
    every split (of `others`: (split, folder)) in which it is empty."""
    files: list[str] = []
    counts: list[int] = []
    skipped: list[str] = []
    prefix = len(str(split_dir)) + 1
    for name in classes:
        before = len(files)
        for folder, _, names in sorted(os.walk(split_dir / name, followlinks=True)):
            relative = folder[prefix:]
            for f in sorted(names):
                (files if _is_image(f) else skipped).append(os.path.join(relative, f))
        counts.append(len(files) - before)
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        where = [f"in {split} ({split_dir}): {examples(empty)}"]
        for other, other_dir in others:
            also = [name for name in empty if not _has_image(other_dir / name)]
            if also:
                where.append(f"in {other} ({other_dir}) too: {examples(also)}")
        raise DatasetError(
            f"{describe.title}: class folders hold no image files (extensions {', '.join(image_extensions())}) "
            f"{'; '.join(where)}. Put the class's images there or remove the folder from every split.\n"
            f"{describe.layout}"
        )
    if skipped and str(split_dir) not in _WARNED_NON_IMAGES:
        _WARNED_NON_IMAGES.add(str(split_dir))
        get_logger().warning(
            f"warning: {describe.title} {split} folder {split_dir}: {len(skipped)} file(s) in class folders are not "
            f"images (by their extension) and are left out: {examples(skipped)}"
        )
    targets = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts, dtype=torch.int64))
    return files, targets


def _option_problems(
    image_size: int, resize_size: int, crop_scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> list[str]:
    """What is wrong with the transform options, as messages naming the ``data.`` keys."""
    problems = []
    if image_size < 1 or resize_size < image_size:
        problems.append(
            f"data.resize_size ({resize_size}) must be at least data.image_size ({image_size}) >= 1: the test "
            "images are resized to resize_size and then centre-cropped to image_size"
        )
    if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
        problems.append(
            f"data.crop_scale must be [low, high] with 0 < low <= high <= 1 (fractions of the image area kept by "
            f"the random crop), got {list(crop_scale)}"
        )
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        problems.append(f"data.mean and data.std need 3 values (R, G, B), std > 0; got {list(mean)} and {list(std)}")
    return problems


def check_transform_options(
    *, image_size: int, resize_size: int, crop_scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> None:
    """Raise a ConfigError listing `_option_problems` (from the config section and from a direct builder call)."""
    problems = _option_problems(image_size, resize_size, crop_scale, mean, std)
    if problems:
        raise ConfigError("; ".join(problems))


def build_folder_split(
    *,
    root: str | Path,
    train: bool,
    split_dirs: tuple[str, str],
    num_classes: int | None,
    num_classes_fix: str,
    describe: Describe,
    image_size: int,
    resize_size: int,
    crop_scale: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    max_bad_images: int = 0,
) -> ImageFolderSource:
    """One split of a folder dataset, after checking the layout of both splits' class folders (`max_bad_images`
    applies to the training split only)."""
    check_transform_options(image_size=image_size, resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"{describe.title} root directory {root} {state} (data.root).\n{describe.layout}")
    names = {True: split_dirs[0], False: split_dirs[1]}
    split, other = ("train", "val") if train else ("val", "train")
    split_dir, other_dir = root / names[train], root / names[not train]
    classes = _class_folders(split_dir, split, describe)
    if num_classes is not None and len(classes) != num_classes:
        raise DatasetError(
            f"{describe.title} {split} folder {split_dir} has {len(classes)} class folders, but data.num_classes is "
            f"{num_classes}. {num_classes_fix}\n{describe.layout}"
        )
    if other_dir.is_dir():  # a missing other split is reported when that split is built (eval needs only val)
        other_classes = _class_folders(other_dir, other, describe)
        if other_classes != classes:
            only_here, only_there = sorted(set(classes) - set(other_classes)), sorted(set(other_classes) - set(classes))
            raise DatasetError(
                f"{describe.title} class folders differ between {split_dir} ({len(classes)}) and {other_dir} "
                f"({len(other_classes)}): only in {split}: [{examples(only_here)}]; only in {other}: "
                f"[{examples(only_there)}]. Both splits need the same class folders (label k is the k-th name in "
                f"sorted order).\n{describe.layout}"
            )
    others = [(other, other_dir)] if other_dir.is_dir() else []
    files, targets = _list_files(split_dir, classes, split, describe, others)
    return ImageFolderSource(
        folder=split_dir, files=files, targets=targets, classes=classes, image_size=image_size,
        resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std,
        max_bad_images=max_bad_images if train else 0, training=train,
    )
