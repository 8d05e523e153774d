"""Tests for datasets/: CIFAR-100 reading and its errors, the synthetic task, deterministic augmentation,
sharded epoch sampling and loading. CIFAR data is small fake data written in the real on-disk format."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import signal
import socket
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.datasets import utils as tv_utils

import ctkd.datasets.cifar as cifar
from conftest import collect_epochs
from ctkd.datasets import DatasetError, build_dataset, build_loader
from ctkd.datasets.hashing import splitmix64
from ctkd.datasets.loader import BatchedDataset, EpochBatchSampler
from ctkd.datasets.transforms import crop_and_flip, crop_params, eval_transform, normalize, train_transform

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# ---------------------------------------------------------------------------------------------- fake CIFAR files


def _split_dict(num: int, rng: np.random.Generator) -> dict[bytes, object]:
    """A train/test batch dict shaped like the official ones (bytes keys, as a Python 3 writer produces)."""
    return {
        b"batch_label": b"fake batch",
        b"filenames": [f"img_{i}.png".encode() for i in range(num)],
        b"fine_labels": rng.integers(0, 100, num).tolist(),
        b"coarse_labels": rng.integers(0, 20, num).tolist(),
        b"data": rng.integers(0, 256, (num, 3072), dtype=np.uint8),
    }


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # protocol 2, like the official files


def write_fake_cifar(root: Path, num_train: int = 200, num_test: int = 100) -> dict[str, dict]:
    """Write root/cifar-100-python/{train,test,meta}; returns the dicts written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    content = {
        "train": _split_dict(num_train, rng),
        "test": _split_dict(num_test, rng),
        "meta": {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    }
    for name, obj in content.items():
        _dump(folder / name, obj)
    return content


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_fake_cifar(tmp_path / "data")
    return tmp_path / "data"


# ---------------------------------------------------------------------------------------------- CIFAR reading


@pytest.mark.parametrize("train,split", [(True, "train"), (False, "test")])
def test_cifar_round_trip(tmp_path: Path, train: bool, split: str) -> None:
    written = write_fake_cifar(tmp_path)[split]
    ds = build_dataset("cifar100", root=str(tmp_path), train=train)
    num = written[b"data"].shape[0]
    assert len(ds) == num and ds.images.shape == (num, 3, 32, 32) and ds.targets.shape == (num,)
    assert ds.images.dtype == torch.uint8 and ds.targets.dtype == torch.int64
    assert np.array_equal(ds.images.reshape(num, -1).numpy(), written[b"data"])
    assert ds.targets.tolist() == written[b"fine_labels"]
    assert ds.num_classes == 100 and ds.classes[:2] == ("fine_0", "fine_1") and len(ds.classes) == 100
    assert ds.mean == MEAN and ds.std == STD


def test_cifar_pixel_order_is_chw(cifar_root: Path) -> None:
    content = pickle.loads((cifar_root / "cifar-100-python/train").read_bytes())
    content[b"data"][5] = 0
    content[b"data"][5, 1 * 1024 + 7 * 32 + 3] = 201  # green channel, row 7, column 3
    _dump(cifar_root / "cifar-100-python/train", content)
    image = build_dataset("cifar100", root=str(cifar_root), train=True).images[5]
    assert image[1, 7, 3] == 201 and int(image.sum()) == 201


def test_cifar_reads_python2_module_names(cifar_root: Path) -> None:
    """The official files name numpy.core.* (pre-numpy-2 module names); those must load too."""
    path = cifar_root / "cifar-100-python/train"
    path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert len(build_dataset("cifar100", root=str(cifar_root), train=True)) == 200


def _assert_how_to_get(message: str, root: Path) -> None:
    assert f"{root}/cifar-100-python/{{train,test,meta}}" in message  # the expected layout
    assert "data.download: true" in message and cifar.URL in message


def test_missing_root_names_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar100", root="no_such_dir", train=True)
    message = str(info.value)
    assert f"root directory {tmp_path / 'no_such_dir'} does not exist" in message
    _assert_how_to_get(message, tmp_path / "no_such_dir")
    assert isinstance(info.value, ValueError)  # DatasetError's documented base


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="folder .*cifar-100-python does not exist") as info:
        build_dataset("cifar100", root=str(tmp_path), train=False)
    _assert_how_to_get(str(info.value), tmp_path)


def test_missing_file_named(cifar_root: Path) -> None:
    (cifar_root / "cifar-100-python/meta").unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar100", root=str(cifar_root), train=True)
    assert f"file {cifar_root / 'cifar-100-python/meta'} does not exist" in str(info.value)
    _assert_how_to_get(str(info.value), cifar_root)


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit(**changes: object):
    def corrupt(path: Path) -> None:
        content = pickle.loads(path.read_bytes())
        for key, value in changes.items():
            if value is None:
                del content[key.encode()]
            else:
                content[key.encode()] = value
        _dump(path, content)

    return corrupt


@pytest.mark.parametrize(
    "file,corrupt,expected",
    [
        ("train", _garbage, "not a readable pickle"),
        ("train", _truncate, "not a readable pickle, e.g. truncated or corrupted"),
        ("test", lambda p: p.write_bytes(b""), "not a readable pickle"),
        ("train", lambda p: _dump(p, [1, 2, 3]), "it holds a list, not a dict"),
        ("train", _edit(fine_labels=None), "keys ['fine_labels'] are missing"),
        ("test", _edit(data=None), "keys ['data'] are missing"),
        ("train", _edit(fine_labels=[100] * 200), "'fine_labels' range from 100 to 100, outside [0, 100)"),
        ("train", _edit(fine_labels=[-1] + [0] * 199), "outside [0, 100)"),
        ("train", _edit(fine_labels=[0] * 7), "'fine_labels' has shape (7,), expected (200,)"),
        ("train", _edit(fine_labels=[0.5] * 200), "'fine_labels' should be integers"),
        ("train", _edit(data=np.zeros((200, 3000), np.uint8)), "'data' should be a uint8 array of shape [N, 3072]"),
        ("train", _edit(data=np.zeros((200, 3072), np.float32)), "found a float32 array"),
        ("train", _edit(data=_RunsCode()), "refers to posix.getcwd"),
        ("meta", lambda p: _dump(p, {b"fine_label_names": [b"a"] * 3}), "a list of 100 names, found 3"),
    ],
)
def test_corrupt_file_error_names_file_and_problem(cifar_root: Path, file: str, corrupt, expected: str) -> None:
    path = cifar_root / "cifar-100-python" / file
    corrupt(path)
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar100", root=str(cifar_root), train=file != "test")
    message = str(info.value)
    assert f"CIFAR-100 file {path} is unusable" in message
    assert expected in message
    # the verdict compares against the official file's MD5
    assert f"Checksum mismatch: its MD5 is {hashlib.md5(path.read_bytes()).hexdigest()}" in message
    assert cifar.FILE_MD5[file] in message


# ---------------------------------------------------------------------------------------------- download


def _fake_archive(tmp_path: Path) -> Path:
    """A cifar-100-python.tar.gz made of fake files, laid out like the official archive."""
    source = tmp_path / "archive_source"
    write_fake_cifar(source)
    archive = tmp_path / "served.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
    return archive


def _serve(monkeypatch: pytest.MonkeyPatch, archive: Path, requested: list[str]) -> None:
    """Make torchvision's downloader copy `archive` instead of reaching the network."""

    def fake_urlretrieve(url: str, filename: str, chunk_size: int = 0) -> None:
        requested.append(url)
        shutil.copyfile(archive, filename)

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", fake_urlretrieve)


def test_download_extracts_where_reader_expects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _fake_archive(tmp_path)
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    requested: list[str] = []
    _serve(monkeypatch, archive, requested)
    root = tmp_path / "fresh" / "data"  # does not exist yet
    ds = build_dataset("cifar100", root=str(root), train=True, download=True)
    assert requested == [cifar.URL]
    assert len(ds) == 200 and (root / "cifar-100-python" / "meta").is_file()
    # files present: no second download
    build_dataset("cifar100", root=str(root), train=False, download=True)
    assert requested == [cifar.URL]


def test_download_wrong_md5_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _fake_archive(tmp_path)
    _serve(monkeypatch, archive, [])  # the official MD5 stays, so torchvision's check fails
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar100", root=str(tmp_path / "data"), train=True, download=True)
    message = str(info.value)
    assert f"{tmp_path / 'data' / 'cifar-100-python.tar.gz'} failed its checksum" in message
    assert hashlib.md5(archive.read_bytes()).hexdigest() in message and cifar.ARCHIVE_MD5 in message


@pytest.mark.parametrize("failure,said", [
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "the host name could not be resolved"),
    (urllib.error.HTTPError(cifar.URL, 503, "Service Unavailable", {}, None), "the server answered HTTP 503"),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "ConnectionRefusedError"),
])
def test_download_network_failure_says_what_failed_and_how_to_place_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError, said: str
) -> None:
    """data.download is already true: the message says what failed and how to place the files by hand, not to set
    data.download: true."""
    def offline(url: str, max_hops: int = 3) -> str:
        raise failure

    monkeypatch.setattr(tv_utils, "_get_redirect_url", offline)
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar100", root=str(tmp_path), train=True, download=True)
    message = str(info.value)
    assert message.startswith(f"data.download is true, but downloading {cifar.URL} into {tmp_path} failed: ")
    assert said in message and "Place the files by hand" in message and f"-C {tmp_path}" in message
    assert "set `data.download: true`" not in message


# ---------------------------------------------------------------------------------------------- registry


def test_unknown_dataset_suggests_close_match() -> None:
    with pytest.raises(ValueError, match="Did you mean 'cifar100'"):
        build_dataset("cifar10", root=".", train=True)


def test_unknown_option_rejected() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['num_clases'\].*'num_classes'"):
        build_dataset("synthetic", root=".", train=True, num_clases=3)


# ---------------------------------------------------------------------------------------------- synthetic


def _synthetic(train: bool = True, **options):
    options = {"train_size": 500, "test_size": 300, **options}
    return build_dataset("synthetic", root="unused", train=train, **options)


def test_synthetic_deterministic_per_seed() -> None:
    a, b, c = _synthetic(seed=3), _synthetic(seed=3), _synthetic(seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(_synthetic(seed=3).images, a.images)
    threads = torch.get_num_threads()
    try:  # nor the thread count (ranks and resumed runs regenerate the data)
        torch.set_num_threads(1)
        assert torch.equal(_synthetic(seed=3).images, a.images)
    finally:
        torch.set_num_threads(threads)


def test_synthetic_shapes_balance_and_splits() -> None:
    train, test = _synthetic(num_classes=7), _synthetic(train=False, num_classes=7)
    assert train.images.shape == (500, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 300 and train.num_classes == 7 and len(train.classes) == 7
    counts = torch.bincount(train.targets, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert not {x.numpy().tobytes() for x in train.images} & {x.numpy().tobytes() for x in test.images}
    assert train.mean == MEAN and train.std == STD


@pytest.mark.parametrize("num_classes", [2, 100])
def test_synthetic_any_class_count(num_classes: int) -> None:
    ds = _synthetic(num_classes=num_classes)
    assert set(ds.targets.tolist()) == set(range(num_classes))


def test_synthetic_rejects_one_class() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 2, got 1"):
        _synthetic(num_classes=1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def _resnet8(num_classes: int) -> nn.Module:
    """A CIFAR resnet8 (one basic block per stage, widths 16/32/64)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )  # fmt: skip


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads can make a step 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_synthetic_is_learnable_by_resnet8(one_thread: None) -> None:
    """About 70% test accuracy (chance 10%) after 3 epochs of 2,000 images: about 12 s on one CPU thread."""
    torch.manual_seed(0)
    options = {"num_classes": 10, "train_size": 2000, "test_size": 1000, "seed": 0}
    train, test = _synthetic(**options), _synthetic(train=False, **options)
    model = _resnet8(10)
    epochs, loader = 3, build_loader(train, batch_size=64, train=True, seed=0, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * len(loader), pct_start=0.25)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, targets, *_ in loader:
            opt.zero_grad()
            F.cross_entropy(model(images), targets).backward()
            opt.step()
            sched.step()
    model.eval()
    eval_loader = build_loader(test, batch_size=500, train=False, seed=0, num_workers=0)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, *_ in eval_loader)
    assert correct / len(test) > 3 * 0.1  # chance is 10%


# ---------------------------------------------------------------------------------------------- transforms


def _splitmix64_reference(x: int) -> int:
    """splitmix64's finaliser on Python ints (exact unsigned 64-bit arithmetic)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_unsigned_reference() -> None:
    values = [0, 1, -1, 2**63 - 1, -(2**63), 12345] + [random.Random(0).getrandbits(64) - 2**63 for _ in range(50)]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & (2**64 - 1) for g in got] == [_splitmix64_reference(v & (2**64 - 1)) for v in values]


def _images(num: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (num, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_crop_at_centre_without_flip_is_identity() -> None:
    images = _images()
    centre = torch.full((16,), 4)
    assert torch.equal(crop_and_flip(images, centre, centre, torch.zeros(16, dtype=torch.bool)), images)


@pytest.mark.parametrize(("shape", "layout"), [
    ((16, 3, 32, 32), torch.contiguous_format),
    ((6, 2, 20, 28), torch.contiguous_format),  # not square: rows and columns of the padded image differ
    ((6, 3, 24, 16), torch.channels_last),  # an NHWC batch
])
def test_crop_and_flip_match_torchvision(shape: tuple[int, ...], layout: torch.memory_format) -> None:
    """Zero-pad 4 + crop at (top, left) in the padded image + hflip, as RandomCrop(size, 4) + RandomHorizontalFlip."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).contiguous(memory_format=layout)
    batch, _, height, width = shape
    top, left, flip = crop_params(7, 2, torch.arange(batch))
    ours = crop_and_flip(images, top, left, flip)
    for k in range(batch):
        expected = TF.crop(TF.pad(images[k], [4]), int(top[k]), int(left[k]), height, width)
        expected = TF.hflip(expected) if flip[k] else expected
        assert torch.equal(ours[k], expected)
    assert crop_and_flip(images[:0], top[:0], left[:0], flip[:0]).shape == (0, *shape[1:])  # an empty batch


def test_offsets_cover_range_and_flips_are_fair() -> None:
    top, left, flip = crop_params(0, 0, torch.arange(20000))
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert counts.numel() == 9 and counts.min() > 20000 / 9 * 0.85  # every offset 0..8, about uniformly
    assert abs(flip.float().mean().item() - 0.5) < 0.02


def test_augmentation_is_pure_function_of_seed_epoch_index() -> None:
    train = _synthetic(train_size=64)
    batches = BatchedDataset(train, train=True, seed=5)
    a = batches[(3, [10, 20, 30], 3)].images
    b = batches[(3, [30, 7, 10, 1], 4)].images
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])  # same sample, other batch and position
    torch.manual_seed(99)
    assert torch.equal(batches[(3, [20], 1)].images[0], a[1])  # global RNG irrelevant
    # another epoch or seed re-draws the crops across the dataset
    params = [torch.stack(crop_params(s, e, torch.arange(1000))) for s, e in [(5, 3), (5, 4), (6, 3)]]
    assert (params[0] != params[1]).any(0).float().mean() > 0.9
    assert (params[0] != params[2]).any(0).float().mean() > 0.9


def test_normalisation_values() -> None:
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip([0, 255, 128], MEAN, STD)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-6)
    # the whole train pipeline equals torchvision's ToTensor-style scaling + Normalize after our crop
    raw = _images(4)
    top, left, flip = crop_params(1, 1, torch.arange(4))
    ours = train_transform(raw, torch.arange(4), seed=1, epoch=1, mean=MEAN, std=STD)
    reference = TF.normalize(crop_and_flip(raw, top, left, flip).float() / 255, list(MEAN), list(STD))
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(eval_transform(raw, mean=MEAN, std=STD), normalize(raw, MEAN, STD))


def test_eval_batches_are_not_augmented() -> None:
    test = _synthetic(train=False)
    images, targets, indices, global_size = BatchedDataset(test, train=False, seed=0)[(9, [4, 2], 2)]
    assert torch.equal(images, normalize(test.images[[4, 2]], MEAN, STD))
    assert targets.tolist() == test.targets[[4, 2]].tolist()
    assert indices.tolist() == [4, 2] and global_size == 2


# ---------------------------------------------------------------------------------------------- sampler


def _epoch(sampler: EpochBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    keys = list(sampler)
    assert all(e == epoch and size == min(sampler.batch_size, sampler.num_samples - b * sampler.batch_size)
               for b, (e, _, size) in enumerate(keys))  # the global batch size travels with each rank's share
    return [list(indices) for _, indices, _ in keys]


def test_sampler_permutation_per_epoch() -> None:
    sampler = EpochBatchSampler(37, 8, seed=0, shuffle=True)
    assert len(sampler) == 5
    epochs = [_epoch(sampler, e) for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [8, 8, 8, 8, 5]  # the last partial batch is kept
        assert sorted(i for b in batches for i in b) == list(range(37))  # no sample dropped or repeated
    assert epochs[0] != epochs[1] != epochs[2]
    assert _epoch(EpochBatchSampler(37, 8, seed=0, shuffle=True), 1) == epochs[1]  # pure function of (seed, epoch)
    assert _epoch(EpochBatchSampler(37, 8, seed=1, shuffle=True), 1) != epochs[1]


def test_sampler_without_shuffle_and_drop_last() -> None:
    assert _epoch(EpochBatchSampler(10, 4, seed=0, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = EpochBatchSampler(10, 4, seed=0, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and _epoch(dropped, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("num_samples,batch_size,world_size", [(37, 8, 2), (45, 8, 4), (64, 16, 2)])
def test_rank_shards_concatenate_to_global_batch(num_samples: int, batch_size: int, world_size: int) -> None:
    single = _epoch(EpochBatchSampler(num_samples, batch_size, seed=3, shuffle=True), 2)
    shards = [
        _epoch(EpochBatchSampler(num_samples, batch_size, seed=3, shuffle=True, rank=r, world_size=world_size), 2)
        for r in range(world_size)
    ]
    assert all(len(s) == len(single) for s in shards)  # every rank runs the same number of steps
    for step, batch in enumerate(single):
        pieces = [s[step] for s in shards]
        assert sum(pieces, []) == batch
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1  # array_split-like


def test_sampler_rejects_non_dividing_batch() -> None:
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by world_size 4"):
        EpochBatchSampler(100, 10, seed=0, shuffle=True, rank=0, world_size=4)


# ---------------------------------------------------------------------------------------------- loader




@pytest.mark.parametrize("train", [True, False])
def test_loader_identical_with_0_and_2_workers(train: bool) -> None:
    ds = _synthetic(train_size=150)
    runs = [
        collect_epochs(build_loader(ds, batch_size=32, train=train, seed=11, num_workers=w), epochs=2) for w in (0, 2)
    ]
    assert len(runs[0]) == len(runs[1]) == 10
    for (x0, y0, i0, n0), (x2, y2, i2, n2) in zip(*runs):
        assert x0.dtype == torch.float32 and x0.shape[1:] == (3, 32, 32) and y0.dtype == torch.int64
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(i0, i2) and n0 == n2 == len(y0)
        assert torch.equal(y0, ds.targets[i0])  # the indices name the samples of the batch
    if train:  # two epochs see different orders and crops
        assert not torch.equal(runs[0][0][0], runs[0][5][0])


def test_loader_leaves_global_rng_alone() -> None:
    loader = build_loader(_synthetic(train_size=64), batch_size=32, train=True, seed=0, num_workers=0)
    state = torch.get_rng_state()
    collect_epochs(loader, epochs=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_workers_survive_sigterm() -> None:
    """SIGTERM to the process group must not kill workers before the main process checkpoints."""
    loader = build_loader(_synthetic(train_size=256), batch_size=16, train=True, seed=0, num_workers=2)
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    for worker in iterator._workers:  # DataLoader internals: the worker processes
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert all(worker.is_alive() for worker in iterator._workers)
    assert len(list(iterator)) == len(loader) - 1
