"""ImageNet-2012 (ILSVRC) as train/<wnid>/ and val/<wnid>/ folders of JPEGs (datasets/folder_layout.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctkd.options import DataOptions, spec

from .base import DATASETS, DatasetError
from .crops import CROP_SCALE
from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource
from .folder_layout import Describe, build_folder_split, check_transform_options

IMAGENET_URL = "https://image-net.org/download.php"


def _imagenet_describe(root: Path) -> Describe:
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
    return Describe("ImageNet", layout, flat_fix)


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
        check_transform_options(
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
    return build_folder_split(
        root=path, train=train, split_dirs=("train", "val"), num_classes=num_classes,
        num_classes_fix=(
            "Some class folders are missing or extra (an incomplete extraction?); for a subset of ImageNet such as "
            "Imagenette (10 classes) set data.num_classes to its number of classes."
        ),
        describe=describe, image_size=image_size, resize_size=resize_size, crop_scale=crop_scale,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, max_bad_images=max_bad_images,
    )
