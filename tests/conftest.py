"""Shared test helpers: the repository root, the reference values of tests/data (see golden.py), tiny run configs."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch

import ctkd.models as models
import golden as golden_module
from ctkd.config import Config, load_config
from ctkd.methods import StepContext

if TYPE_CHECKING:
    from ctkd.build import Experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
Tensors = dict[str, torch.Tensor]


def _holds_tensor(value: object) -> bool:
    """Whether `value` is a tensor or a list/tuple/dict holding one."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


_pytest_approx = pytest.approx


def _approx_of_plain_numbers(expected: object, *args: object, **kwargs: object) -> object:
    """pytest.approx, refusing tensors with every pytest version: 9.2 iterates a 0-d tensor and raises inside, older
    versions happened to accept it, so a suite green on an old pytest failed on a fresh install."""
    if _holds_tensor(expected):
        raise TypeError("pytest.approx of a tensor: compare plain numbers (.item() or .tolist()) instead")
    return _pytest_approx(expected, *args, **kwargs)


pytest.approx = _approx_of_plain_numbers  # type: ignore[assignment]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's own ctkd cache (ctkd.cache; teachers' test accuracies), never the user's: set in the environment,
    so launched processes use it too."""
    import os

    from ctkd.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("ctkd-cache")
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module of tiny forwards (`pytestmark = pytest.mark.usefixtures("single_thread")`): as
    fast when the CPUs are free, far faster when other processes share them (OpenMP workers spin-wait for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def collect_epochs(loader, epochs: int) -> list:
    """Every batch `loader` yields over epochs 0 .. epochs-1 (its sampler told each epoch)."""
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def seeded_experiment(cfg: Config) -> Experiment:
    """The run's objects on one process, with the weights a run of `cfg` would start from."""
    from ctkd.build import build_experiment
    from ctkd.distributed import DistributedContext
    from ctkd.system import seed_everything

    seed_everything(cfg.seed)
    return build_experiment(cfg, DistributedContext())


def zoo_distiller(options: object, student: str = "resnet8", teacher: str = "resnet14", *, batch: int = 4,
                  temperature: torch.nn.Module | None = None) -> tuple:
    """(Distiller, Batch): teacher → student of the zoo with 10 classes, measured as a run measures them (features,
    pre-activation as the method asks), a learned global τ unless given, default γ·CE + α·KD, in train mode; and
    one batch of random 32×32 images (generator seed 1)."""
    from ctkd.datasets.loader import Batch
    from ctkd.distiller import build_distiller, measure_setup
    from ctkd.methods import METHODS
    from ctkd.options import LossConfig
    from ctkd.temperatures import GlobalTemperature

    method = METHODS.get(options.name)
    torch.manual_seed(0)
    nets = [models.build_model(name, num_classes=10) for name in (student, teacher)]
    setup = measure_setup(*nets, image_shape=(3, 32, 32), num_classes=10, seed=0,
                          train_targets=torch.zeros(0, dtype=torch.long), features=method.features,
                          preact=method.preact, teacher_preact=method.preact_of("teacher"))
    distiller = build_distiller(options, student=nets[0], teacher=nets[1], loss=LossConfig(), setup=setup,
                                temperature=GlobalTemperature() if temperature is None else temperature)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return distiller.train(), Batch(images, torch.arange(batch) % 10, torch.arange(batch), batch)


def one_epoch_record(tmp_path: Path, teacher_file: Path, method: dict, **sections: dict) -> dict:
    """Train conftest's tiny CTKD run for one epoch with `method` (the `method:` section) and `sections` overriding
    its sections; the one metrics.jsonl record it writes."""
    import json

    from ctkd.trainer import run

    data = ctkd_config(tmp_path, teacher_file, epochs=1, **sections)
    data["method"] = method
    cfg = load(data, tmp_path)
    run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    return records[0]


def randn_seeded(seed: int, *shape: int) -> torch.Tensor:
    """A standard-normal tensor from its own generator: the same values whatever ran before."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_maps(shapes: list[tuple[int, ...]], seed: int, batch: int = 3) -> list[torch.Tensor]:
    """One seeded (batch, *shape) tensor per shape, seeds seed, seed + 1, ...: a network's feature list."""
    return [randn_seeded(seed + i, batch, *shape) for i, shape in enumerate(shapes)]


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average of non-overlapping blocks down to size×size (written out, not adaptive_avg_pool2d)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def assert_entrywise_close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """|got − expected| ≤ atol + rtol·|expected| entry-wise (torch.testing's rule, without its import cost)."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape
    assert ((got - expected).abs() <= atol + rtol * expected.abs()).all(), (got, expected)


def feature_setup(student: list[tuple[int, ...]], teacher: list[tuple[int, ...]]) -> object:
    """A MethodSetup with the given per-sample feature shapes, 10 classes and no training labels."""
    from ctkd.methods import MethodSetup

    return MethodSetup(student, teacher, 10, torch.zeros(0, dtype=torch.long), seed=0)


def standalone_method(cls: type, options: object, setup: object) -> torch.nn.Module:
    """A method around a stand-in student, τ = 4 (its loss terms are called directly with given features)."""
    from ctkd.options import LossConfig
    from ctkd.temperatures import FixedTemperature

    return cls(torch.nn.Linear(2, 10), FixedTemperature(4.0), options=options, loss=LossConfig(), setup=setup)


def feature_step(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> object:
    """The StepInputs of a step on these features (no logits), τ = 4, epoch 1, λ = 1."""
    from ctkd.datasets.loader import Batch
    from ctkd.methods import StepContext, TeacherOutput
    from ctkd.methods.base import StepInputs

    n = student[0].shape[0]
    batch = Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n), n)
    return StepInputs(batch, None, student, TeacherOutput(None, teacher), torch.tensor(4.0),
                      StepContext(epoch=1, step=0, grl_lambda=1.0), None)


def numeric_gradient(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of a function of a nested list, at the float64 tensor x."""
    grad = torch.zeros_like(x, dtype=torch.float64)
    for index in range(x.numel()):
        plus, minus = x.double().clone(), x.double().clone()
        plus.view(-1)[index] += h
        minus.view(-1)[index] -= h
        grad.view(-1)[index] = (f(plus.tolist()) - f(minus.tolist())) / (2 * h)
    return grad


DAMAGE = ("half", "empty", "flip")


def damage(path: Path, kind: str) -> None:
    """Truncate `path` to half, empty it, or flip one bit in the middle of its bytes (tensor data)."""
    data = bytearray(path.read_bytes())
    if kind == "half":
        data = data[: len(data) // 2]
    elif kind == "empty":
        data = bytearray()
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def linear_net(classes: int = 5) -> torch.nn.Module:
    """A 12-input linear classifier (flattened (B, 3, 2, 2) inputs)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, classes))


def logit_distiller(method: str, student: torch.nn.Module, teacher: torch.nn.Module | None,
                    temperature: torch.nn.Module | None, loss: object) -> object:
    """A distiller of logit-only `method` (no feature shapes needed) with its default options."""
    from ctkd.config import method_class
    from ctkd.distiller import build_distiller
    from ctkd.methods import MethodSetup

    setup = MethodSetup([], [], 5, torch.zeros(0, dtype=torch.long), seed=0)
    return build_distiller(method_class(method).Options(), student=student, teacher=teacher, temperature=temperature,
                           loss=loss, setup=setup)


def first_batch_step(exp: Experiment, grl_lambda: float = 1.0) -> tuple[Tensors, Tensors]:
    """One training step of `exp` on its first batch of epoch 1: (the loss terms, the trainable state after it)."""
    exp.train_loader.sampler.set_epoch(1)
    batch = next(iter(exp.train_loader))
    out = exp.distiller.train()(batch, StepContext(epoch=1, step=0, grl_lambda=torch.tensor(grl_lambda)))
    exp.optimizer.zero_grad()
    sum(out.losses.values()).backward()
    exp.optimizer.step()
    losses = {key: value.detach() for key, value in out.losses.items()}
    return losses, {key: value.detach().clone() for key, value in exp.distiller.unwrapped.state_dict().items()}


def train_epoch(exp: Experiment, cfg: Config, batches: object = None, *, grl_lambda: float = 1.0,
                epoch: int = 1) -> tuple[dict, dict]:
    """One epoch of `exp` as a run trains it (Trainer.train_epoch), over `batches` (default: its loader's epoch)."""
    from ctkd.step import EpochRun
    from ctkd.trainer import Trainer

    return Trainer(exp, cfg).train_epoch(EpochRun.begin(exp, epoch, grl_lambda, None), batches)


@pytest.fixture(scope="session")
def golden() -> ModuleType:
    """tests/golden.py: deterministic weights, fixed inputs and the authors' logits and loss values."""
    return golden_module


@pytest.fixture(scope="session")
def zoo() -> dict:
    """The authors' zoo (tests/data/zoo.json): per architecture, state_dict layout, parameter count, feature shapes."""
    return golden_module.zoo()


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` as a YAML file (creating folders) and return its path."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_run_config(tmp_path: Path, name: str = "run", **sections: dict) -> dict:
    """A config dict for a seconds-long CPU run on a small synthetic dataset; `sections` update its top level."""
    config = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "device": "cpu",
        "epochs": 3,
        "method": "vanilla",
        "data": {
            "name": "synthetic",
            "batch_size": 32,
            "num_workers": 0,
            "num_classes": 10, "train_size": 160, "test_size": 70, "seed": 0,
        },
        "student": {"name": "resnet8"},
        # batches from data.num_workers loader workers as written in each test (auto would make them in-process)
        "runtime": {"data_on_device": "off"},
        "optimizer": {"lr": 0.05, "lr_decay_epochs": [2]},
        "logging": {"tensorboard": True, "progress_bar": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet14 teacher saved in the CRD/mdistiller layout ({'epoch', 'model', 'accuracy', 'optimizer'})."""
    torch.manual_seed(123)
    teacher = models.build_model("resnet14", num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": teacher.state_dict(), "accuracy": torch.tensor(71.0), "optimizer": {}}, path)
    return path


def ctkd_config(tmp_path: Path, teacher_file: Path, name: str = "run", **sections: dict) -> dict:
    """A tiny global-CTKD config distilling resnet8 from the resnet14 teacher file."""
    base = tiny_run_config(
        tmp_path,
        name,
        method="kd",
        teacher={"name": "resnet14", "checkpoint": str(teacher_file)},
        temperature={"name": "global"},
        curriculum={"name": "cosine", "loops": 2},
    )
    merged = {k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
              for k, v in sections.items()}
    config = {**base, **merged}
    if config["temperature"].get("name") == "fixed" and "curriculum" not in sections:
        del config["curriculum"]  # a fixed τ has no curriculum (its keys would be an error)
    return config


def load(data: dict, tmp_path: Path, file: str = "cfg.yaml") -> Config:
    """Write `data` as tmp_path/file and load it as a config."""
    return load_config(write_yaml(tmp_path / file, data))


@pytest.fixture(scope="module")
def straight_in_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run in this process: its fingerprint and the indices of every step."""
    from resume_tools import Steps, dropout_config, fingerprint

    from ctkd.trainer import run

    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch:
        steps = Steps(monkeypatch)
        run(load(dropout_config(root, "run"), root))
    return {"fingerprint": fingerprint(root / "run"), "seen": steps.seen}
