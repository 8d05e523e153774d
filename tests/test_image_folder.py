"""Folder datasets (datasets/folder.py): listing, per-sample decoding, deterministic RandomResizedCrop, errors."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
from imagefolder import class_names, random_image, write_flat_val, write_image_folder
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from conftest import collect_epochs
from ctkd.build import build_split, check_inputs
from ctkd.config import ConfigError, config_from_dict
from ctkd.datasets import DatasetError, DataSource, ImageFolderSource, build_dataset, build_loader
from ctkd.datasets.crops import crop_box, crop_draws, resized_crop_params
from ctkd.datasets.folder import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError
from ctkd.datasets.transforms import eval_transform, normalize, train_transform

SMALL = {"image_size": 32, "resize_size": 36}  # the 40x48 test images: resize the shorter side to 36, crop 32


def _imagenet(root: Path, *, train: bool, **options) -> ImageFolderSource:
    return build_dataset("imagenet", root=str(root), train=train, **{"num_classes": 3, **SMALL, **options})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imagenet", classes=3, per_class=4)


# ---------------------------------------------------------------------------------------------- listing


def test_splits_list_files_and_labels(tree: Path) -> None:
    train, val = _imagenet(tree, train=True), _imagenet(tree, train=False)
    assert isinstance(train, DataSource) and isinstance(train, ImageFolderSource)
    assert len(train) == len(val) == 12 and train.num_classes == 3
    assert train.classes == val.classes == tuple(class_names(3))
    assert train.targets.dtype == torch.int64 and train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert train.image_shape == val.image_shape == (3, 32, 32)
    assert train.path(5) == str(tree.resolve() / "train" / "n00000001" / "n00000001_1.JPEG")


def test_order_and_labels_match_torchvision_image_folder(tree: Path) -> None:
    """Same samples in the same order as torchvision's ImageFolder: nested folders, other extensions, other files."""
    rng = np.random.default_rng(0)
    nested = tree / "train" / "n00000001" / "sub"
    nested.mkdir()
    random_image(rng, (40, 48), np.zeros(3)).save(nested / "deep.png")
    random_image(rng, (40, 48), np.zeros(3)).save(tree / "train" / "n00000001" / "UPPER.PNG")
    random_image(rng, (40, 48), np.zeros(3)).save(tree / "train" / "n00000001" / "n00000001_1-b.JPEG")
    (tree / "train" / "n00000002" / "notes.txt").write_text("not an image")
    ours = _imagenet(tree, train=True)
    reference = ImageFolder(str(tree.resolve() / "train"))
    assert [(ours.path(i), int(ours.targets[i])) for i in range(len(ours))] == reference.samples
    assert list(ours.classes) == reference.classes and len(ours) == 15


def test_source_pickles_small_and_equal(tree: Path) -> None:
    train = _imagenet(tree, train=True)
    blob = pickle.dumps(train)
    assert len(blob) < 4000  # paths are one byte array: no per-file Python objects travel to the workers
    copy = pickle.loads(blob)
    idx = torch.tensor([3, 7])
    expected = train.load_batch(idx, epoch=1, train=True, seed=0)
    assert torch.equal(copy.load_batch(idx, epoch=1, train=True, seed=0), expected)


# ---------------------------------------------------------------------------------------------- random resized crop


def test_resized_crop_params_deterministic_and_in_bounds() -> None:
    for index in range(300):
        for height, width in [(40, 48), (375, 500), (500, 333), (7, 300), (300, 7), (1, 1)]:
            params = resized_crop_params(3, 2, index, height, width)
            assert params == resized_crop_params(3, 2, index, height, width)  # a pure function
            top, left, h, w, flip = params
            assert isinstance(flip, bool)
            assert 0 < h <= height and 0 < w <= width and 0 <= top <= height - h and 0 <= left <= width - w
    assert resized_crop_params(3, 2, 0, 375, 500) != resized_crop_params(3, 3, 0, 375, 500)
    assert resized_crop_params(3, 2, 0, 375, 500) != resized_crop_params(4, 2, 0, 375, 500)


def test_resized_crop_params_follow_torchvision_distribution() -> None:
    """Area fraction, aspect ratio, position and flip statistics match torchvision's RandomResizedCrop's."""
    height, width, n = 375, 500, 4000
    ours = np.array([resized_crop_params(0, 0, i, height, width) for i in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    transform = v2.RandomResizedCrop(224)
    theirs = np.array([
        [p["top"], p["left"], p["height"], p["width"]]
        for p in (transform.make_params([torch.empty(3, height, width)]) for _ in range(n))
    ], dtype=np.float64)

    def stats(p: np.ndarray) -> np.ndarray:
        top, left, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
        area = h * w / (height * width)
        rel_top = np.where(h < height, top / np.maximum(height - h, 1), 0.5)
        rel_left = np.where(w < width, left / np.maximum(width - w, 1), 0.5)
        return np.array([area.mean(), area.std(), np.log(w / h).mean(), np.log(w / h).std(), rel_top.mean(),
                         rel_left.mean(), (area > 0.5).mean()])

    assert np.allclose(stats(ours[:, :4]), stats(theirs), atol=0.025), (stats(ours[:, :4]), stats(theirs))
    assert abs(ours[:, 4].mean() - 0.5) < 0.03  # fair flips
    # the uniforms behind them are uniform and the streams are not correlated
    uniforms, _ = crop_draws(0, 0, torch.arange(n))
    assert abs(uniforms.mean() - 0.5) < 0.01 and abs(np.corrcoef(uniforms[:, 0, 0], uniforms[:, 0, 1])[0, 1]) < 0.05


def test_crop_falls_back_like_torchvision() -> None:
    """No random box of area >= 8% fits a 10x200 image: torchvision's central fallback, whatever the draws."""
    torch.manual_seed(0)
    theirs = v2.RandomResizedCrop(8).make_params([torch.empty(3, 10, 200)])
    expected = (theirs["top"], theirs["left"], theirs["height"], theirs["width"])
    assert expected == (0, 93, 10, 13)
    assert {resized_crop_params(0, 0, i, 10, 200)[:4] for i in range(50)} == {expected}
    # the other two fallbacks: an image within the ratio range is kept whole, a too tall one is cut to the ratio
    square = np.tile([[0.0, 0.5, 0.0, 0.0]], (10, 1))  # the whole area at aspect ratio 1: a 55x55 box, too high
    assert crop_box(square, 50, 60, (1.0, 1.0), (3 / 4, 4 / 3)) == (0, 0, 50, 60)
    assert crop_box(square, 50, 60, (1.0, 1.0), (3.0, 4.0)) == (15, 0, 20, 60)  # width / 3 = 20 rows, centred


# ---------------------------------------------------------------------------------------------- transforms


def test_batches_have_the_right_shape_and_type(tree: Path) -> None:
    for train in (True, False):
        source = _imagenet(tree, train=train)
        images = source.load_batch(torch.tensor([0, 5, 11]), epoch=0, train=train, seed=0)
        assert images.dtype == torch.float32 and images.shape == (3, 3, 32, 32)
        assert images.abs().max() < 3  # normalised with ImageNet's constants: (0 - 0.485) / 0.229 ≈ -2.1, ...
        assert torch.isfinite(images).all()


def test_augmentation_is_a_pure_function_of_seed_epoch_index(tree: Path) -> None:
    source = _imagenet(tree, train=True)
    a = source.load_batch(torch.tensor([1, 6, 9]), epoch=3, train=True, seed=5)
    b = source.load_batch(torch.tensor([9, 2, 1]), epoch=3, train=True, seed=5)
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])  # same sample in another batch or position
    torch.manual_seed(123)
    assert torch.equal(source.load_batch(torch.tensor([6]), epoch=3, train=True, seed=5)[0], a[1])
    everything = torch.arange(len(source))
    epochs = [source.load_batch(everything, epoch=e, train=True, seed=5) for e in (3, 4)]
    other_seed = source.load_batch(everything, epoch=3, train=True, seed=6)
    differ = [(x != y).flatten(1).any(1).float().mean() for x, y in [(epochs[0], epochs[1]), (epochs[0], other_seed)]]
    assert all(d > 0.8 for d in differ)
    # eval ignores epoch and seed
    val = _imagenet(tree, train=False)
    assert torch.equal(val.load_batch(everything, epoch=0, train=False, seed=0),
                       val.load_batch(everything, epoch=7, train=False, seed=9))


def test_train_transform_is_torchvision_resized_crop_and_flip(tree: Path) -> None:
    source = _imagenet(tree, train=True)
    indices = torch.arange(len(source))
    batch = source.load_batch(indices, epoch=2, train=True, seed=1)
    flips = 0
    for i in indices.tolist():
        image = Image.open(source.path(i)).convert("RGB")
        top, left, h, w, flip = resized_crop_params(1, 2, i, image.height, image.width)
        expected = TF1.resized_crop(image, top, left, h, w, [32, 32], TF1.InterpolationMode.BILINEAR)
        expected = TF1.hflip(expected) if flip else expected
        flips += flip
        assert torch.equal(batch[i], normalize(TF1.pil_to_tensor(expected)[None], IMAGENET_MEAN, IMAGENET_STD)[0])
    assert 0 < flips < len(source)  # both branches were exercised


def test_val_transform_is_torchvision_resize_and_centre_crop(tree: Path) -> None:
    source = _imagenet(tree, train=False)
    reference = v2.Compose([v2.Resize(36), v2.CenterCrop(32), v2.PILToTensor()])
    batch = source.load_batch(torch.arange(len(source)), epoch=0, train=False, seed=0)
    for i in range(len(source)):
        expected = reference(Image.open(source.path(i)).convert("RGB"))
        assert expected.shape == (3, 32, 32)
        assert torch.equal(batch[i], normalize(expected[None], IMAGENET_MEAN, IMAGENET_STD)[0])


def test_grayscale_and_cmyk_images_become_rgb(tree: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tree / "val" / "n00000000"
    random_image(rng, (40, 48), np.full(3, 100.0), mode="L").save(folder / "zz_gray.JPEG")
    random_image(rng, (40, 48), np.full(3, 100.0), mode="CMYK").save(folder / "zz_cmyk.JPEG")
    source = _imagenet(tree, train=False)
    gray_index = next(i for i in range(len(source)) if source.path(i).endswith("zz_gray.JPEG"))
    cmyk_index = next(i for i in range(len(source)) if source.path(i).endswith("zz_cmyk.JPEG"))
    assert Image.open(source.path(gray_index)).mode == "L" and Image.open(source.path(cmyk_index)).mode == "CMYK"
    for index in (gray_index, cmyk_index):
        for train in (True, False):
            pixels = source.transform(source.load_image(index), index, epoch=0, train=train, seed=0)
            assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    pixels = source.transform(source.load_image(gray_index), gray_index, epoch=0, train=False, seed=0)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])  # gray replicated
    batch = source.load_batch(torch.tensor([gray_index, cmyk_index]), epoch=0, train=True, seed=0)
    assert batch.shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- loaders




@pytest.mark.parametrize("train", [True, False])
def test_loader_identical_with_0_and_2_workers(tree: Path, train: bool) -> None:
    source = _imagenet(tree, train=train)
    runs = [collect_epochs(build_loader(source, batch_size=5, train=train, seed=3, num_workers=w), 2) for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 6
    for (x0, y0, i0, n0), (x2, y2, i2, n2) in zip(*runs):
        assert x0.shape[1:] == (3, 32, 32) and x0.dtype == torch.float32
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(i0, i2) and n0 == n2
        assert torch.equal(y0, source.targets[i0])
    if train:
        first = torch.cat([b.images for b in runs[0][:3]])[torch.cat([b.indices for b in runs[0][:3]]).argsort()]
        second = torch.cat([b.images for b in runs[0][3:]])[torch.cat([b.indices for b in runs[0][3:]]).argsort()]
        assert not torch.equal(first, second)  # another epoch, other crops


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_truncated_image_names_its_file_and_index(tree: Path) -> None:
    source = _imagenet(tree, train=True)
    bad = 6
    _truncate(source.path(bad))
    with pytest.raises(ImageDecodeError) as info:
        source.load_batch(torch.tensor([2, bad]), epoch=0, train=True, seed=0)
    assert source.path(bad) in str(info.value) and f"sample {bad} " in str(info.value)
    assert "truncated" in str(info.value)
    assert "data.max_bad_images" in str(info.value)  # a training image: the budget that would tolerate it is named
    assert source.load_batch(torch.tensor([2, 7]), epoch=0, train=True, seed=0).shape == (2, 3, 32, 32)


def test_truncated_image_error_survives_the_worker_reraise(tree: Path) -> None:
    source = _imagenet(tree, train=False)
    bad = 9
    _truncate(source.path(bad))
    iterator = iter(build_loader(source, batch_size=4, train=False, seed=0, num_workers=2))
    try:
        with pytest.raises(DatasetError) as info:
            list(iterator)
    finally:  # the traceback pytest keeps would keep the workers alive until exit, where they hang the session
        iterator._shutdown_workers()
    message = str(info.value)
    assert type(info.value) is ImageDecodeError
    assert source.path(bad) in message and f"sample {bad} " in message and "worker process" in message
    assert "Traceback" not in message and message.count("\n") == 0  # the one-line user error, not a traceback
    assert "data.max_bad_images" not in message  # a test image is never replaced


# ---------------------------------------------------------------------------------------------- layout errors


def _error(root: Path, *, train: bool = False, name: str = "imagenet", **options) -> str:
    with pytest.raises(DatasetError) as info:
        if name == "imagenet":
            _imagenet(root, train=train, **options)
        else:
            build_dataset(name, root=str(root), train=train, **options)
    return str(info.value)


def test_missing_root_and_split(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "does not exist" in message and "image-net.org" in message
    write_image_folder(tmp_path / "only_train", splits=("train",))
    message = _error(tmp_path / "only_train", train=False)
    assert f"val folder {tmp_path / 'only_train' / 'val'} does not exist" in message
    assert len(_imagenet(tmp_path / "only_train", train=True)) == 12  # val is not needed to build train


def test_flat_validation_folder_says_how_to_sort_it(tree: Path) -> None:
    val = write_flat_val(tree, count=7)
    for train in (False, True):  # building train compares the class folders with val's, so it sees it too
        message = _error(tree, train=train)
        assert str(val.resolve()) in message and "holds 7 image(s) directly" in message
        assert "valprep.sh" in message and "LOC_val_solution.csv" in message
        assert "ILSVRC2012_validation_ground_truth" in message


def test_loose_images_beside_class_folders(tree: Path) -> None:
    random_image(np.random.default_rng(0), (40, 48), np.zeros(3)).save(tree / "val" / "stray.JPEG")
    message = _error(tree)
    assert "holds 1 image(s) outside its 3 class folders (stray.JPEG)" in message


def test_empty_class_folder_is_named(tree: Path) -> None:
    for file in (tree / "train" / "n00000002").iterdir():
        file.unlink()
    (tree / "train" / "n00000002" / "readme.txt").write_text("no images here")
    message = _error(tree, train=True)
    assert "n00000002" in message and "hold no image files" in message and str(tree.resolve() / "train") in message


def test_a_class_folder_empty_in_both_splits_is_named_in_both(tree: Path) -> None:
    for split in ("train", "val"):
        for file in (tree / split / "n00000002").iterdir():
            file.unlink()
    for train in (True, False):
        message = _error(tree, train=train)
        first, second = ("train", "val") if train else ("val", "train")
        assert f"in {first} ({tree.resolve() / first}): n00000002" in message
        assert f"in {second} ({tree.resolve() / second}) too: n00000002" in message


def test_non_image_files_in_class_folders_are_reported_once(tree: Path) -> None:
    import logging

    (tree / "train" / "n00000001" / "notes.txt").write_text("not an image")
    (tree / "train" / "n00000001" / "scan.pdf").write_bytes(b"%PDF")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the project's logger, whatever an earlier test configured for the console
    logging.getLogger("ctkd").addHandler(handler)
    try:
        first = _imagenet(tree, train=True)
        _imagenet(tree, train=True)  # a run lists a split more than once
    finally:
        logging.getLogger("ctkd").removeHandler(handler)
    warnings = [r.getMessage() for r in records if "are not images" in r.getMessage()]
    assert len(warnings) == 1 and "2 file(s)" in warnings[0]
    assert "n00000001/notes.txt" in warnings[0] and "n00000001/scan.pdf" in warnings[0]
    assert len(first) == 12  # left out of the split


def test_class_count_must_match_num_classes(tree: Path) -> None:
    message = _error(tree, num_classes=1000)
    assert "has 3 class folders, but data.num_classes is 1000" in message and str(tree.resolve() / "val") in message
    assert len(build_dataset("image_folder", root=str(tree), train=True, **SMALL)) == 12  # null: the folder count
    assert "data.num_classes is 4" in _error(tree, name="image_folder", num_classes=4)


def test_train_and_val_class_folders_must_agree(tree: Path) -> None:
    (tree / "val" / "n00000002").rename(tree / "val" / "n00000009")
    for train in (True, False):
        message = _error(tree, train=train)
        assert "only in train: [n00000002]" in message and "only in val: [n00000009]" in message


def test_download_is_refused_with_instructions(tree: Path) -> None:
    message = _error(tree, download=True)
    assert "cannot be downloaded automatically" in message and "image-net.org" in message
    assert "train/<wnid>/*.JPEG" in message
    assert "nothing to download" in _error(tree, name="image_folder", download=True)


# ---------------------------------------------------------------------------------------------- image_folder, config


def test_image_folder_options(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", classes=2, per_class=3, size=(30, 20), layout="named",
                              val_per_class=2, splits=("training", "testing"))
    options = dict(train_dir="training", val_dir="testing", image_size=16, resize_size=18, mean=(0.5, 0.5, 0.5),
                   std=(0.25, 0.25, 0.25))
    train = build_dataset("image_folder", root=str(root), train=True, **options)
    val = build_dataset("image_folder", root=str(root), train=False, **options)
    assert (len(train), len(val), train.classes) == (6, 4, ("class_000", "class_001"))
    batch = val.load_batch(torch.tensor([0]), epoch=0, train=False, seed=0)
    expected = v2.Compose([v2.Resize(18), v2.CenterCrop(16), v2.PILToTensor()])(Image.open(val.path(0)))
    assert torch.equal(batch[0], (expected.float() / 255 - 0.5) / 0.25)
    assert train.load_batch(torch.tensor([0, 5]), epoch=0, train=True, seed=0).shape == (2, 3, 16, 16)


def _config(tmp_path: Path, data: dict) -> object:
    return config_from_dict({
        "output_dir": str(tmp_path / "run"), "method": "vanilla", "device": "cpu", "student": {"name": "resnet8"},
        "data": {"num_workers": 0, **data},
    }, "test")


def test_config_section_and_check_inputs_decode_nothing(tree: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path, {"name": "imagenet", "root": str(tree), "num_classes": 3, **SMALL})
    assert cfg.data.dataset_options() == {"image_size": 32, "resize_size": 36, "crop_scale": (0.08, 1.0),
                                          "num_classes": 3, "max_bad_images": 0}

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened while building a split")

    monkeypatch.setattr(Image, "open", no_decoding)
    check_inputs(cfg)
    train = build_split(cfg, train=True)
    assert len(train) == 12 and train.image_shape == (3, 32, 32)
    bad = _config(tmp_path, {"name": "imagenet", "root": str(tmp_path / "missing")})
    with pytest.raises(DatasetError, match="does not exist"):
        check_inputs(bad)


@pytest.mark.parametrize("data,message", [
    ({"name": "imagenet", "crop_scale": [0.5]}, "data.crop_scale must be [low, high]"),
    ({"name": "imagenet", "crop_scale": [0.6, 0.2]}, "data.crop_scale must be [low, high]"),
    ({"name": "image_folder", "crop_scale": [0.1, 1.5]}, "data.crop_scale must be [low, high]"),
    ({"name": "imagenet", "image_size": 300}, "data.resize_size (256) must be at least data.image_size (300)"),
    ({"name": "image_folder", "mean": [0.5, 0.5]}, "data.mean and data.std need 3 values"),
    ({"name": "image_folder", "std": [0.5, 0.0, 0.5]}, "'data.std' each item must be > 0"),
])
def test_config_rejects_bad_transform_options(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, data)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- in-memory sources


def test_in_memory_sets_implement_the_same_interface() -> None:
    ds = build_dataset("synthetic", root="unused", train=True, num_classes=4, train_size=20)
    assert isinstance(ds, DataSource) and ds.image_shape == (3, 32, 32)
    idx = torch.tensor([3, 0, 17])
    assert torch.equal(ds.load_batch(idx, epoch=2, train=True, seed=7),
                       train_transform(ds.images[idx], idx, seed=7, epoch=2, mean=ds.mean, std=ds.std))
    assert torch.equal(ds.load_batch(idx, epoch=2, train=False, seed=7),
                       eval_transform(ds.images[idx], mean=ds.mean, std=ds.std))
    assert not torch.equal(ds.load_batch(idx, epoch=2, train=True, seed=7),
                           ds.load_batch(idx, epoch=3, train=True, seed=7))


def test_resized_crop_is_applied_at_the_drawn_box(tree: Path) -> None:
    """The crop is taken from the box the params name: a synthetic image whose columns encode their position."""
    width, height = 64, 48
    columns = np.tile(np.linspace(0, 255, width), (height, 1))
    Image.fromarray(np.stack([columns] * 3, -1).astype(np.uint8)).save(tree / "train" / "n00000000" / "ramp.png")
    source = _imagenet(tree, train=True, image_size=8, resize_size=8)
    index = next(i for i in range(len(source)) if source.path(i).endswith("ramp.png"))
    for epoch in range(5):
        top, left, h, w, flip = resized_crop_params(0, epoch, index, height, width)
        pixels = source.transform(source.load_image(index), index, epoch=epoch, train=True, seed=0)[0].float()
        row = pixels[pixels.shape[0] // 2].flip(0) if flip else pixels[pixels.shape[0] // 2]
        expected_span = (left * 255 / (width - 1), (left + w - 1) * 255 / (width - 1))
        assert expected_span[0] - 12 <= row.min() and row.max() <= expected_span[1] + 12
        assert row[0] < row[-1]  # left to right once a flip is undone
