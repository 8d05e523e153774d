"""Any labelled image folder tree, with ImageNet-style transforms at any resolution (datasets/folder_layout.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctkd.options import DataOptions, spec

from .base import DATASETS, DatasetError
from .crops import CROP_SCALE
from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource
from .folder_layout import Describe, build_folder_split, check_transform_options


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
        check_transform_options(
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
    describe = Describe("Image folder", layout, "Move each image into a sub-folder named after its class.")
    if download:
        raise DatasetError(
            f"data.download is true, but dataset image_folder reads your own files and has nothing to download; "
            f"set data.download: false.\n{layout}"
        )
    return build_folder_split(
        root=path, train=train, split_dirs=(train_dir, val_dir), num_classes=num_classes,
        num_classes_fix=(
            "Set data.num_classes to the number of class folders (or null to take it from the folders), or add or "
            "remove class folders."
        ),
        describe=describe, image_size=image_size, resize_size=resize_size, crop_scale=crop_scale, mean=mean, std=std,
        max_bad_images=max_bad_images,
    )
