"""CIFAR-100 from the official Python pickles, validated at load time with errors that name the file.

Expected layout (what the official archive extracts to)::

    <root>/cifar-100-python/train   50,000 images
    <root>/cifar-100-python/test    10,000 images
    <root>/cifar-100-python/meta    the 100 fine class names

torchvision.datasets.CIFAR100 is deliberately not used for reading: for a missing root and for garbage
files alike it says only "Dataset not found or corrupted", without a path.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctkd.options import DataOptions

from .base import DATASETS, DatasetError, ImageDataset

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
# MD5s of the extracted files of the official release (the same ones torchvision checks).
FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
NUM_CLASSES = 100
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
_IMAGE_SHAPE = (3, 32, 32)

# Everything a CIFAR pickle may reference: numpy's array reconstruction under its old and new module names,
# and _codecs.encode, which Python 3 uses for bytes in protocol-2 pickles. Any other global means the file is
# not a CIFAR batch, and refusing it also keeps a stray pickle in a data folder from running code.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
    for name in ("_reconstruct", "scalar", "_frombuffer")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the numpy globals found in CIFAR pickles."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never contains")
        return super().find_class(module, name)


def _how_to_get(root: Path, downloading: bool = False) -> str:
    """The expected layout and how to get it; `downloading`: the download was tried, so only the manual way."""
    automatic = "" if downloading else "set `data.download: true` (or call with download=True), or "
    return (
        f"Expected layout: {root}/{FOLDER}/{{train,test,meta}}, the Python version of CIFAR-100 as extracted "
        f"from {URL.rsplit('/', 1)[1]}.\n"
        f"To get it, {automatic}download {URL} (MD5 {ARCHIVE_MD5}) on a machine with internet and extract it into "
        f"{root} (tar xzf {URL.rsplit('/', 1)[1]} -C {root})."
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_error(path: Path, problem: str) -> DatasetError:
    """An error for a file that exists but is unusable, with its checksum verdict (damaged or not the official file)."""
    actual = _md5(path)
    expected = FILE_MD5[path.name]
    if actual == expected:
        verdict = f"Its MD5 {actual} matches the official file, so the reader and the release disagree."
    else:
        verdict = (
            f"Checksum mismatch: its MD5 is {actual}, the official file's is {expected}; the file is damaged or "
            "not the official release. Delete the folder and download the dataset again."
        )
    return DatasetError(
        f"CIFAR-100 file {path} is unusable: {problem}.\n{verdict}\n{_how_to_get(path.parent.parent)}"
    )


def _check_present(root: Path) -> None:
    """Raise naming the first missing piece of the layout: root, folder or file."""
    folder = root / FOLDER
    for path, kind in [(root, "root directory"), (folder, "folder")]:
        if not path.is_dir():
            state = "is not a directory" if path.exists() else "does not exist"
            raise DatasetError(f"CIFAR-100 {kind} {path} {state}.\n{_how_to_get(root)}")
    for name in FILE_MD5:
        if not (folder / name).is_file():
            raise DatasetError(f"CIFAR-100 file {folder / name} does not exist.\n{_how_to_get(root)}")


def _unpickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR pickle as a dict with str keys."""
    try:
        with path.open("rb") as f:
            # latin1 decodes the Python 2 strings of the official files (numpy's advice for py2 arrays)
            content = _CifarUnpickler(f, encoding="latin1").load()
    # Unpickling arbitrary bytes can raise almost any exception type (EOFError for a truncated file,
    # UnpicklingError, ValueError, KeyError, UnicodeDecodeError, ...); all mean "not a CIFAR pickle".
    except Exception as exc:
        problem = f"it is not a readable pickle, e.g. truncated or corrupted ({type(exc).__name__}: {exc})"
        raise _file_error(path, problem) from exc
    if not isinstance(content, dict):
        raise _file_error(path, f"it holds a {type(content).__name__}, not a dict")
    # The official files have Python 2 str keys (str under latin1); files written by Python 3 have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _require_keys(path: Path, content: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in content]
    if missing:
        raise _file_error(path, f"keys {missing} are missing (found {sorted(map(str, content))})")


def _images_from(path: Path, data: Any) -> torch.Tensor:
    """The 'data' entry, [N, 3072] uint8 rows, as (N, 3, 32, 32) images."""
    row = int(np.prod(_IMAGE_SHAPE))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == row):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _file_error(path, f"'data' should be a uint8 array of shape [N, {row}], found a {found}")
    # Each row is the 1024 red, then green, then blue values of a row-major 32x32 image: CHW order.
    # np.require copies only if the unpickled array is not already contiguous and writable.
    return torch.from_numpy(np.require(data, requirements=["C", "W"]).reshape(-1, *_IMAGE_SHAPE))


def _labels_from(path: Path, labels: Any, count: int) -> torch.Tensor:
    """The 'fine_labels' entry as an int64 tensor of `count` labels in [0, 100)."""
    try:
        labels = np.asarray(labels)
    except ValueError as exc:  # ragged nested lists
        raise _file_error(path, f"'fine_labels' is not a flat list of integers ({exc})") from exc
    if labels.shape != (count,):
        raise _file_error(path, f"'fine_labels' has shape {labels.shape}, expected ({count},) for {count} images")
    if count and labels.dtype.kind not in "iu":
        raise _file_error(path, f"'fine_labels' should be integers, found dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if count and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        found = f"from {labels.min()} to {labels.max()}"
        raise _file_error(path, f"'fine_labels' range {found}, outside [0, {NUM_CLASSES})")
    return torch.from_numpy(labels)


def _read_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and fine labels (N,) int64 from a train/test pickle."""
    content = _unpickle(path)
    _require_keys(path, content, ("data", "fine_labels"))
    images = _images_from(path, content["data"])
    return images, _labels_from(path, content["fine_labels"], images.shape[0])


def _read_class_names(path: Path) -> tuple[str, ...]:
    content = _unpickle(path)
    _require_keys(path, content, ("fine_label_names",))
    names = content["fine_label_names"]
    if not (isinstance(names, list) and len(names) == NUM_CLASSES):
        size = len(names) if isinstance(names, list) else type(names).__name__
        raise _file_error(path, f"'fine_label_names' should be a list of {NUM_CLASSES} names, found {size}")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _download(root: Path) -> None:
    """Fetch and extract the official archive into `root`, with torchvision's MD5 check of the archive."""
    archive = root / URL.rsplit("/", 1)[1]
    try:
        from torchvision.datasets import utils as tv_utils  # only to download: torchvision takes seconds to import

        tv_utils.download_and_extract_archive(URL, download_root=str(root), md5=ARCHIVE_MD5)
    except OSError as exc:  # no network, refused or reset connection (URLError is an OSError)
        raise DatasetError(
            f"data.download is true, but downloading {URL} into {root} failed: {_network_reason(exc)}. "
            f"Place the files by hand instead.\n{_how_to_get(root, downloading=True)}"
        ) from exc
    except RuntimeError as exc:  # torchvision's "File not found or corrupted." after a failed MD5 check
        actual = _md5(archive) if archive.is_file() else "unavailable (no file)"
        raise DatasetError(
            f"Downloaded archive {archive} failed its checksum: MD5 {actual}, expected {ARCHIVE_MD5} "
            f"(torchvision: {exc}). Delete it and try again.\n{_how_to_get(root, downloading=True)}"
        ) from exc


def _network_reason(exc: OSError) -> str:
    """What failed, in words: the name lookup, the connection, the server's answer, or the disk."""
    reason = getattr(exc, "reason", exc)  # urllib's URLError wraps the socket error
    text = str(reason)
    if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return f"the host name could not be resolved (no network or no DNS?): {text}"
    if getattr(exc, "code", None) is not None:  # an HTTP error: the server answered
        return f"the server answered HTTP {exc.code} ({getattr(exc, 'reason', '')})"
    return f"{type(reason).__name__}: {text}"


@dataclass(frozen=True)
class Cifar100Data(DataOptions):
    """CIFAR-100 (the official Python pickles), no options beyond the common ones."""

    name: str = "cifar100"


@DATASETS.register("cifar100", options=Cifar100Data)
def cifar100(*, root: str | Path, train: bool, download: bool = False) -> ImageDataset:
    """Load one CIFAR-100 split into memory, downloading it first if asked and not already present.

    Raises:
        DatasetError: the root, folder or a file is missing (message: absolute path, expected layout, how
            to get it), or a file is not a valid CIFAR-100 pickle (message: the file, what is wrong, and
            whether its MD5 matches the official release).
    """
    root = Path(root).expanduser().resolve()
    folder = root / FOLDER
    if download and not all((folder / name).is_file() for name in FILE_MD5):
        root.mkdir(parents=True, exist_ok=True)
        _download(root)
    _check_present(root)
    images, targets = _read_split(folder / ("train" if train else "test"))
    return ImageDataset(
        images=images,
        targets=targets,
        num_classes=NUM_CLASSES,
        mean=MEAN,
        std=STD,
        classes=_read_class_names(folder / "meta"),
    )
