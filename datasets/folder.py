"""Folders of image files (ImageNet and any ImageFolder tree), decoded and augmented per sample in the loader's workers.

Expected layout (torchvision's ImageFolder, one folder per class; class k is the k-th folder name in sorted order)::

    <root>/train/<class>/*.JPEG     (any of torchvision's IMG_EXTENSIONS, in sub-folders too)
    <root>/val/<class>/*.JPEG

Only the file list is read when a split is built (os.scandir/os.walk, no image is opened), so a split of any size
costs a few bytes per file: the relative paths are packed into one byte array. Images are decoded with PIL, converted
to RGB (ImageNet has grayscale and CMYK JPEGs) and transformed with torchvision.transforms.v2.functional on the PIL
image, as the authors' pipeline does (docs/settings.md, ImageNet):

- train: RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3), bilinear) + horizontal flip (p = 0.5), with
  torchvision's algorithm (10 attempts, then the central fallback) but with every random number drawn from a hash of
  (seed, epoch, index) (`resized_crop_params`), so the data does not depend on workers, batching or resuming;
- eval: resize the shorter side to resize_size, centre crop image_size;
- then ToTensor-style scaling to [0, 1] and Normalize(mean, std).

An image file that cannot be decoded stops the run with an `ImageDecodeError` naming the file and its sample index.
With `data.max_bad_images: N` > 0, up to N unreadable *training* files are tolerated instead: each is replaced by the
next readable file of its class (in file order, wrapping around within the class), with the augmentation of the
sample it replaces, so the replacement is deterministic; the count reaches the epoch's metrics (`bad_images`), and
the N+1-th unreadable file stops the run, naming the files. A test image that cannot be read always stops the run.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ctkd.errors import ConfigError
from ctkd.logging import get_logger
from ctkd.options import DataOptions, spec

from .base import DATASETS, DatasetError
from .hashing import hash_keys, splitmix64
from .transforms import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
CROP_RATIO = (3 / 4, 4 / 3)
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before its central fallback
_DRAWS_PER_ATTEMPT = 4  # area, log aspect ratio, top, left
_EXAMPLES = 5  # file or folder names quoted in an error


# ---------------------------------------------------------------------------------------------- random resized crop


def crop_draws(seed: int, epoch: int, indices: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers of the train transform of samples `indices` in `epoch`.

    Sub-stream k of sample i is splitmix64(hash(seed, epoch, i) XOR k): stream 0 gives the flip (its top bit), streams
    1..40 the four uniforms of each of the 10 crop attempts (53-bit floats in [0, 1)).

    Returns:
        (uniforms, flip): float64 (B, 10, 4) and bool (B,).
    """
    key = hash_keys(seed, epoch, indices.reshape(-1))
    streams = splitmix64(key[:, None] ^ torch.arange(1 + _ATTEMPTS * _DRAWS_PER_ATTEMPT))
    flip = streams[:, 0] < 0
    mantissa = (streams[:, 1:] >> 11) & ((1 << 53) - 1)  # the top 53 bits, as a non-negative int64
    uniforms = mantissa.to(torch.float64) * 2.0**-53
    return uniforms.reshape(-1, _ATTEMPTS, _DRAWS_PER_ATTEMPT).numpy(), flip.numpy()


def crop_box(
    uniforms: np.ndarray, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with given random numbers: (top, left, h, w) of the crop.

    Args:
        uniforms: (10, 4) numbers in [0, 1): per attempt the area fraction, log aspect ratio, top and left draws.
        height, width: size of the image.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled uniformly in log space.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in uniforms.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    # torchvision's fallback: the largest central crop whose aspect ratio is within `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_params(
    seed: int,
    epoch: int,
    index: int,
    height: int,
    width: int,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of the train transform of sample `index` (an image of `height` x `width`) in `epoch`.

    A pure function of its arguments: torchvision's RandomResizedCrop algorithm fed with `crop_draws`.
    """
    uniforms, flip = crop_draws(seed, epoch, torch.tensor([index]))
    return (*crop_box(uniforms[0], height, width, scale, ratio), bool(flip[0]))


# ---------------------------------------------------------------------------------------------- the data source


class ImageDecodeError(DatasetError):
    """An image file of a folder dataset cannot be decoded; the message names the file and its sample index.

    Raised in a DataLoader worker, it reaches the main process re-created by the loader as
    ``ImageDecodeError("Caught ImageDecodeError in DataLoader worker process k.\\nOriginal Traceback ...")``; that
    message is cut back to the original one (plus the worker), so the command line still reports it in one line.
    """

    def __init__(self, message: str) -> None:
        caught = re.match(r"Caught \w+ (in DataLoader worker process \d+)\.\n", message)
        if caught:
            name = type(self).__qualname__
            for marker in (f"{type(self).__module__}.{name}: ", f"{name}: "):
                if marker in message:
                    message = f"{message.rpartition(marker)[2].rstrip()} (raised {caught.group(1)})"
                    break
        super().__init__(message)


def _pack_paths(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Paths as one uint8 array of their bytes plus int64 offsets: 2 array objects however many files there are.

    (A list of 1.28M str would be 1.28M Python objects, copied page by page into every forked worker as their
    reference counts change, and pickled one by one under spawn.)
    """
    encoded = [os.fsencode(p) for p in paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class ImageFolderSource:
    """One split of an image folder: file paths and labels in memory, images decoded per sample (a `DataSource`)."""

    def __init__(
        self,
        *,
        folder: str | Path,
        files: Sequence[str],
        targets: Tensor,
        classes: Sequence[str],
        image_size: int,
        resize_size: int,
        crop_scale: Sequence[float] = CROP_SCALE,
        crop_ratio: Sequence[float] = CROP_RATIO,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_bad_images: int = 0,
        training: bool = False,
    ) -> None:
        """`files` are paths relative to `folder` (the split's folder); `targets[k]` is the label of `files[k]`, and
        the labels are sorted (each class's files are contiguous, as `_list_files` lists them).

        `max_bad_images` > 0: up to that many unreadable files are replaced in training batches (see the module's
        docstring); 0: an unreadable file stops the run. `training`: this is the training split (its errors say
        that data.max_bad_images can tolerate such files).
        """
        assert targets.dtype == torch.int64 and targets.shape == (len(files),)
        self.folder = str(folder)
        self._path_bytes, self._path_offsets = _pack_paths(files)
        self._targets = targets
        self._classes = tuple(classes)
        self.image_size, self.resize_size = image_size, resize_size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_bad_images = max_bad_images
        self.training = training
        # per sample: 1 + the last epoch its file was found unreadable (0: never). In shared memory, so that what
        # the loader's worker processes find is seen by the training process (and by the other workers).
        self._bad = torch.zeros(len(files), dtype=torch.int32).share_memory_() if max_bad_images > 0 else None

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def targets(self) -> Tensor:
        return self._targets

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    def __len__(self) -> int:
        return self._targets.shape[0]

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        start, end = self._path_offsets[index], self._path_offsets[index + 1]
        return os.path.join(self.folder, os.fsdecode(self._path_bytes[start:end].tobytes()))

    def load_image(self, index: int) -> Image.Image:
        """Sample `index` decoded as an RGB PIL image; `ImageDecodeError` names the file if it cannot be read."""
        path = self.path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # loads the pixels: a truncated file fails here, not later
        # PIL reports unreadable files with many exception types (OSError, SyntaxError, ValueError,
        # DecompressionBombError, ...); all mean this file cannot be used.
        except Exception as exc:
            tolerate = (" (or set data.max_bad_images: N to replace up to N unreadable training images by readable "
                        "ones of their class)" if self.training and self.max_bad_images == 0 else "")
            raise ImageDecodeError(
                f"image file {path} (sample {index} of the split in {self.folder}) cannot be read: "
                f"{type(exc).__name__}: {exc}. Replace it with a valid image (e.g. copy it again from the "
                f"original archive) or delete it{tolerate}"
            ) from exc

    def transform(self, image: Image.Image, index: int, *, epoch: int, train: bool, seed: int) -> Tensor:
        """uint8 (3, S, S), S = image_size: random resized crop + flip of (seed, epoch, index), or resize + crop."""
        if not train:
            return self._transform(image, None, False)
        uniforms, flip = crop_draws(seed, epoch, torch.tensor([index]))
        return self._transform(image, uniforms[0], bool(flip[0]))

    def _transform(self, image: Image.Image, uniforms: np.ndarray | None, flip: bool) -> Tensor:
        """The train transform with the given random numbers (`crop_draws`), or the eval transform if None."""
        import torchvision.transforms.v2.functional as TF  # noqa: N812 - imported here: seconds at start-up otherwise
        from torchvision.transforms import InterpolationMode

        size = [self.image_size, self.image_size]
        if uniforms is not None:
            top, left, h, w = crop_box(uniforms, image.height, image.width, self.crop_scale, self.crop_ratio)
            image = TF.resized_crop(image, top, left, h, w, size, interpolation=InterpolationMode.BILINEAR)
            if flip:
                image = TF.horizontal_flip(image)
        else:
            image = TF.resize(image, [self.resize_size], interpolation=InterpolationMode.BILINEAR)
            image = TF.center_crop(image, size)
        return TF.pil_to_tensor(image)

    def load_batch(self, indices: Tensor, *, epoch: int, train: bool, seed: int) -> Tensor:
        """Decode, transform and normalise the samples `indices`: float32 (B, 3, image_size, image_size)."""
        uniforms, flips = crop_draws(seed, epoch, indices) if train else (None, None)
        out = torch.empty(len(indices), *self.image_shape, dtype=torch.uint8)
        tolerant = train and self._bad is not None
        for k, index in enumerate(indices.tolist()):
            image = self._load_or_replace(index, epoch) if tolerant else self.load_image(index)
            if uniforms is None:
                out[k] = self._transform(image, None, False)
            else:
                out[k] = self._transform(image, uniforms[k], bool(flips[k]))
        return normalize(out, self.mean, self.std)

    def bad_images(self, epoch: int) -> int:
        """How many unreadable files this process's loader met (and replaced) in training epoch `epoch`."""
        return 0 if self._bad is None else int((self._bad == epoch + 1).sum())

    def bad_record(self) -> dict[int, int]:
        """The unreadable files this process's loader met: sample index → 1 + the last epoch it was met in."""
        if self._bad is None:
            return {}
        found = self._bad.nonzero().flatten().tolist()
        return {index: int(self._bad[index]) for index in found}

    def check_budget(self, record: dict[int, int]) -> None:
        """Stop (naming the files) when the unreadable files met by all processes together, `record` (a merge of
        their `bad_record`s), are more than data.max_bad_images: N processes tolerate N images, not N times N."""
        if len(record) > self.max_bad_images:
            raise ImageDecodeError(
                f"{len(record)} training image files cannot be read (over all processes), more than "
                f"data.max_bad_images = {self.max_bad_images} allows: {_examples([self.path(i) for i in record])}"
            )

    def _load_or_replace(self, index: int, epoch: int) -> Image.Image:
        """Sample `index` decoded, or, if its file cannot be read, the next readable file of its class."""
        try:
            return self.load_image(index)
        except ImageDecodeError as err:
            self._count_bad(index, epoch, err)
        label = int(self._targets[index])
        low = int(torch.searchsorted(self._targets, label))
        high = int(torch.searchsorted(self._targets, label, right=True))
        for other in [*range(index + 1, high), *range(low, index)]:
            try:
                return self.load_image(other)
            except ImageDecodeError as err:
                self._count_bad(other, epoch, err)
        raise ImageDecodeError(
            f"no image file of class {self._classes[label]} ({high - low} files, samples {low}..{high - 1} of the "
            f"split in {self.folder}) can be read, so unreadable sample {index} cannot be replaced; replace them"
        )

    def _count_bad(self, index: int, epoch: int, err: ImageDecodeError) -> None:
        """Record that sample `index`'s file is unreadable; stop (naming the files) past data.max_bad_images."""
        assert self._bad is not None
        first = int(self._bad[index]) == 0
        self._bad[index] = epoch + 1
        bad = self._bad.nonzero().flatten().tolist()
        if len(bad) > self.max_bad_images:
            raise ImageDecodeError(
                f"{len(bad)} training image files cannot be read, more than data.max_bad_images = "
                f"{self.max_bad_images} allows: {_examples([self.path(i) for i in bad])}. The last one: {err}"
            )
        if first:
            get_logger().warning(
                f"warning: training image {self.path(index)} (sample {index}) cannot be read; it is replaced by the "
                f"next readable image of its class ({len(bad)} of data.max_bad_images = {self.max_bad_images})"
            )


# ---------------------------------------------------------------------------------------------- listing the files


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """torchvision's IMG_EXTENSIONS (imported on first use: torchvision takes seconds to import)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def _is_image(name: str) -> bool:
    """torchvision's ImageFolder test: the name ends with one of its IMG_EXTENSIONS, case-insensitively."""
    return name.lower().endswith(image_extensions())


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:_EXAMPLES])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _EXAMPLES else shown


@dataclass(frozen=True)
class _Describe:
    """What the errors of one dataset say: its title, the expected layout and how to sort a flat folder."""

    title: str
    layout: str
    flat_fix: str


def _class_folders(split_dir: Path, split: str, describe: _Describe) -> list[str]:
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
            f"{describe.title} {split} folder {split_dir} holds {len(loose)} image(s) directly ({_examples(loose)}) "
            f"and no class folders: the images must be sorted into one folder per class. {describe.flat_fix}\n"
            f"{describe.layout}"
        )
    if loose:
        raise DatasetError(
            f"{describe.title} {split} folder {split_dir} holds {len(loose)} image(s) outside its {len(classes)} "
            f"class folders ({_examples(loose)}); they would be ignored. Move each into its class folder (an "
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
    split_dir: Path, classes: Sequence[str], split: str, describe: _Describe, others: Sequence[tuple[str, Path]] = ()
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
        where = [f"in {split} ({split_dir}): {_examples(empty)}"]
        for other, other_dir in others:
            also = [name for name in empty if not _has_image(other_dir / name)]
            if also:
                where.append(f"in {other} ({other_dir}) too: {_examples(also)}")
        raise DatasetError(
            f"{describe.title}: class folders hold no image files (extensions {', '.join(image_extensions())}) "
            f"{'; '.join(where)}. Put the class's images there or remove the folder from every split.\n"
            f"{describe.layout}"
        )
    if skipped and str(split_dir) not in _WARNED_NON_IMAGES:
        _WARNED_NON_IMAGES.add(str(split_dir))
        get_logger().warning(
            f"warning: {describe.title} {split} folder {split_dir}: {len(skipped)} file(s) in class folders are not "
            f"images (by their extension) and are left out: {_examples(skipped)}"
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


def _check_transform_options(
    *, image_size: int, resize_size: int, crop_scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> None:
    """Raise a ConfigError listing `_option_problems` (from the config section and from a direct builder call)."""
    problems = _option_problems(image_size, resize_size, crop_scale, mean, std)
    if problems:
        raise ConfigError("; ".join(problems))


def _build(
    *,
    root: str | Path,
    train: bool,
    split_dirs: tuple[str, str],
    num_classes: int | None,
    num_classes_fix: str,
    describe: _Describe,
    image_size: int,
    resize_size: int,
    crop_scale: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    max_bad_images: int = 0,
) -> ImageFolderSource:
    """One split of a folder dataset, after checking the layout of both splits' class folders (`max_bad_images`
    applies to the training split only)."""
    _check_transform_options(image_size=image_size, resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std)
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
                f"({len(other_classes)}): only in {split}: [{_examples(only_here)}]; only in {other}: "
                f"[{_examples(only_there)}]. Both splits need the same class folders (label k is the k-th name in "
                f"sorted order).\n{describe.layout}"
            )
    others = [(other, other_dir)] if other_dir.is_dir() else []
    files, targets = _list_files(split_dir, classes, split, describe, others)
    return ImageFolderSource(
        folder=split_dir, files=files, targets=targets, classes=classes, image_size=image_size,
        resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std,
        max_bad_images=max_bad_images if train else 0, training=train,
    )


# ---------------------------------------------------------------------------------------------- imagenet


IMAGENET_URL = "https://image-net.org/download.php"


def _imagenet_describe(root: Path) -> _Describe:
    layout = (
        f"Expected layout: {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class named by "
        "its WordNet ID (n01440764, ...), the same folders in both splits. ImageNet cannot be downloaded "
        f"automatically: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (ILSVRC 2012) from {IMAGENET_URL} "
        "after accepting its terms of access (Kaggle's 'ImageNet Object Localization Challenge' holds the same "
        "images), extract the training archive (one .tar per class inside) into train/<wnid>/ and sort the "
        "validation images into val/<wnid>/."
    )
    flat_fix = (
        "This is the layout of the raw ILSVRC2012_img_val.tar. Sort it: run the well-known valprep.sh (from "
        "soumith/imagenetloader.torch, used by PyTorch's examples/imagenet) inside that folder; or move each "
        "ILSVRC2012_val_*.JPEG into the folder of the wnid that LOC_val_solution.csv (Kaggle) gives for it, or that "
        "the devkit's ILSVRC2012_validation_ground_truth.txt gives (class IDs, mapped to wnids by its meta.mat); or "
        "put ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in the root and let "
        "torchvision.datasets.ImageNet(root, split='val') sort it."
    )
    return _Describe("ImageNet", layout, flat_fix)


@dataclass(frozen=True)
class ImageNetData(DataOptions):
    """ImageNet-2012 (ILSVRC) as train/<wnid>/ and val/<wnid>/ folders of JPEGs, decoded per sample."""

    name: str = "imagenet"
    image_size: int = spec(224, ge=1)  # side of the random resized crop (train) and of the centre crop (test)
    resize_size: int = spec(256, ge=1)  # test images: shorter side resized to this before the centre crop
    crop_scale: tuple[float, ...] = spec(CROP_SCALE, gt=0)  # [low, high] area fraction of the train random crop
    num_classes: int = spec(1000, ge=2)  # class folders expected in each split (e.g. 10 for Imagenette)
    max_bad_images: int = spec(0, ge=0)  # unreadable training images replaced (and counted) before the run stops

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_transform_options(
            image_size=self.image_size, resize_size=self.resize_size, crop_scale=self.crop_scale,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )


@DATASETS.register("imagenet", options=ImageNetData)
def imagenet(
    *,
    root: str | Path,
    train: bool,
    download: bool = False,
    image_size: int = 224,
    resize_size: int = 256,
    crop_scale: Sequence[float] = CROP_SCALE,
    num_classes: int = 1000,
    max_bad_images: int = 0,
) -> ImageFolderSource:
    """One split of ImageNet from `<root>/train` or `<root>/val` (class k = the k-th wnid folder in sorted order).

    Raises:
        DatasetError: `download` (ImageNet cannot be downloaded automatically), a missing root or split folder,
            the unsorted validation layout, a class count other than `num_classes`, train and val class folders that
            differ, an empty class folder: each message names the path and the fix.
    """
    path = Path(root).expanduser().resolve()
    describe = _imagenet_describe(path)
    if download:
        raise DatasetError(
            f"data.download is true, but ImageNet cannot be downloaded automatically; set data.download: false and "
            f"point data.root at your copy.\n{describe.layout}"
        )
    return _build(
        root=path, train=train, split_dirs=("train", "val"), num_classes=num_classes,
        num_classes_fix=(
            "Some class folders are missing or extra (an incomplete extraction?); for a subset of ImageNet such as "
            "Imagenette (10 classes) set data.num_classes to its number of classes."
        ),
        describe=describe, image_size=image_size, resize_size=resize_size, crop_scale=crop_scale,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, max_bad_images=max_bad_images,
    )


# ---------------------------------------------------------------------------------------------- any image folder


@dataclass(frozen=True)
class ImageFolderData(DataOptions):
    """Any labelled folder tree <root>/<train_dir>/<class>/* and <root>/<val_dir>/<class>/*, at any resolution."""

    name: str = "image_folder"
    train_dir: str = "train"  # training split folder, below root
    val_dir: str = "val"  # test split folder, below root
    image_size: int = spec(224, ge=1)  # side of the random resized crop (train) and of the centre crop (test)
    resize_size: int = spec(256, ge=1)  # test images: shorter side resized to this before the centre crop
    crop_scale: tuple[float, ...] = spec(CROP_SCALE, gt=0)  # [low, high] area fraction of the train random crop
    num_classes: int | None = spec(None, ge=2)  # class folders expected in each split; null = as many as there are
    mean: tuple[float, ...] = IMAGENET_MEAN  # per-channel mean of the [0, 1] pixels (R, G, B), for normalisation
    std: tuple[float, ...] = spec(IMAGENET_STD, gt=0)  # per-channel standard deviation (R, G, B)
    max_bad_images: int = spec(0, ge=0)  # unreadable training images replaced (and counted) before the run stops

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_transform_options(
            image_size=self.image_size, resize_size=self.resize_size, crop_scale=self.crop_scale, mean=self.mean,
            std=self.std,
        )


@DATASETS.register("image_folder", options=ImageFolderData)
def image_folder(
    *,
    root: str | Path,
    train: bool,
    download: bool = False,
    train_dir: str = "train",
    val_dir: str = "val",
    image_size: int = 224,
    resize_size: int = 256,
    crop_scale: Sequence[float] = CROP_SCALE,
    num_classes: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_bad_images: int = 0,
) -> ImageFolderSource:
    """One split of an ImageFolder tree, `<root>/<train_dir>` or `<root>/<val_dir>`, with ImageNet-style transforms.

    Raises:
        DatasetError: `download` (there is nothing to fetch), a missing root or split folder, images outside class
            folders, a class count other than `num_classes`, train and val class folders that differ, an empty class
            folder: each message names the path and the fix.
    """
    path = Path(root).expanduser().resolve()
    layout = (
        f"Expected layout (torchvision's ImageFolder): {path}/{train_dir}/<class>/<images> and "
        f"{path}/{val_dir}/<class>/<images>, one folder per class, the same class folders in both splits "
        f"(data.root, data.train_dir, data.val_dir)."
    )
    describe = _Describe("Image folder", layout, "Move each image into a sub-folder named after its class.")
    if download:
        raise DatasetError(
            f"data.download is true, but dataset image_folder reads your own files and has nothing to download; "
            f"set data.download: false.\n{layout}"
        )
    return _build(
        root=path, train=train, split_dirs=(train_dir, val_dir), num_classes=num_classes,
        num_classes_fix=(
            "Set data.num_classes to the number of class folders (or null to take it from the folders), or add or "
            "remove class folders."
        ),
        describe=describe, image_size=image_size, resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std,
        max_bad_images=max_bad_images,
    )
