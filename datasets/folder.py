"""One split of an image folder as a data source: file paths and labels in memory, images decoded and augmented per
sample in the loader's workers (the folder layout and its checks: datasets/folder_layout.py).

Images are decoded with PIL, converted to RGB (ImageNet has grayscale and CMYK JPEGs) and transformed with
torchvision.transforms.v2.functional on the PIL image, as the authors' pipeline does (docs/settings.md, ImageNet):

- train: RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3), bilinear) + horizontal flip (p = 0.5), with
  every random number drawn from a hash of (seed, epoch, index) (datasets/crops.py);
- eval: resize the shorter side to resize_size, centre crop image_size;
- then ToTensor-style scaling to [0, 1] and Normalize(mean, std).

An image file that cannot be decoded stops the run with an `ImageDecodeError` naming the file and its sample index.
With `data.max_bad_images: N` > 0, up to N unreadable *training* files are tolerated instead: each is replaced by the
next readable file of its class (in file order, wrapping around within the class), with the augmentation of the
sample it replaces, so the replacement is deterministic; the count reaches the epoch's metrics (`bad_images`), and
the N+1-th unreadable file stops the run, naming the files. A test image that cannot be read always stops the run.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ctkd.logging import get_logger

from .base import DatasetError, examples
from .crops import CROP_RATIO, CROP_SCALE, crop_box, crop_draws
from .transforms import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NEVER = torch.iinfo(torch.int32).min  # a bad-image mark for a file that was always read (epochs can be ≤ 0)


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
        # 1 + the last training epoch each file was found unreadable in, NEVER if it never was (stage epochs are ≤ 0)
        self._bad = torch.full((len(files),), NEVER, dtype=torch.int32).share_memory_() if max_bad_images > 0 else None

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
        found = (self._bad != NEVER).nonzero().flatten().tolist()
        return {index: int(self._bad[index]) for index in found}

    def check_budget(self, record: dict[int, int]) -> None:
        """Stop (naming the files) when the unreadable files met by all processes together, `record` (a merge of
        their `bad_record`s), are more than data.max_bad_images: N processes tolerate N images, not N times N."""
        if len(record) > self.max_bad_images:
            raise ImageDecodeError(
                f"{len(record)} training image files cannot be read (over all processes), more than "
                f"data.max_bad_images = {self.max_bad_images} allows: {examples([self.path(i) for i in record])}"
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
        first = int(self._bad[index]) == NEVER
        self._bad[index] = epoch + 1
        bad = (self._bad != NEVER).nonzero().flatten().tolist()
        if len(bad) > self.max_bad_images:
            raise ImageDecodeError(
                f"{len(bad)} training image files cannot be read, more than data.max_bad_images = "
                f"{self.max_bad_images} allows: {examples([self.path(i) for i in bad])}. The last one: {err}"
            )
        if first:
            get_logger().warning(
                f"warning: training image {self.path(index)} (sample {index}) cannot be read; it is replaced by the "
                f"next readable image of its class ({len(bad)} of data.max_bad_images = {self.max_bad_images})"
            )
