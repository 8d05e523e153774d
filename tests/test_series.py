"""ctkd/series and ctkd/integrity: verified files, fallback to the previous intact checkpoint, retention, explicit
resume of bad files."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from resume_tools import checkpoint_names, crash_then_resume, dropout_config, files, fingerprint

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_dropout_mlp: dropout makes the RNG state matter)
import train as train_cli
from conftest import DAMAGE, damage, load, write_yaml
from ctkd import series
from ctkd.config import ConfigError
from ctkd.logging import get_logger
from ctkd.series import CheckpointSeries
from ctkd.trainer import run


# ------------------------------------------------------------------------------------------------ helpers
class Messages(logging.Handler):
    """Collects the project logger's messages (it does not propagate to pytest's caplog once the CLI ran)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def messages():
    handler, logger = Messages(), get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("kind", DAMAGE)
def test_auto_resume_sets_a_damaged_newest_checkpoint_aside_and_uses_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str], straight_in_process: dict, kind: str
) -> None:
    """A2/A3: the newest checkpoint (epoch 3, step 2) truncated, emptied or bit-flipped: it is renamed aside (bytes
    kept), a warning names it and the reason, and the run continues from epoch 2's end exactly."""
    crash_then_resume(tmp_path, monkeypatch, crash=(3, 3))
    out = tmp_path / "run"
    newest = out / "ckpt-e0003-s000002.pth"
    assert checkpoint_names(out) == ["best.pth", "ckpt-e0002-s000005.pth", newest.name, "last.pth"]
    damage(newest, kind)
    damaged = newest.read_bytes()
    messages.clear()
    run(load(dropout_config(tmp_path, "run"), tmp_path), resume="auto")
    aside = [p for p in out.iterdir() if p.name.startswith(newest.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # set aside, never deleted
    reason = {"half": "truncated", "empty": "truncated", "flip": "checksum mismatch"}[kind]
    warning = next(line for line in messages if "set aside" in line)
    assert str(newest) in warning and reason in warning and aside[0].name in warning
    assert any(f"resumed from {out / 'ckpt-e0002-s000005.pth'} after epoch 2" in line for line in messages)
    assert fingerprint(out) == straight_in_process["fingerprint"]


@pytest.mark.parametrize("problem", ["truncated", "flipped", "missing", "directory", "foreign"])
def test_explicit_resume_of_a_bad_checkpoint_is_an_error(
    tmp_path: Path, problem: str, capsys: pytest.CaptureFixture
) -> None:
    """A4: --resume PATH with a damaged, missing or non-checkpoint file fails before training, naming the file and
    why; nothing in the run directory changes (no fresh start, nothing set aside)."""
    config = write_yaml(tmp_path / "c.yaml", dropout_config(tmp_path, "run", epochs=1))
    assert train_cli.main(["--config", str(config)]) == 0
    out = tmp_path / "run"
    path = {"missing": out / "nope.pth", "directory": out}.get(problem, out / "last.pth")
    if problem in ("truncated", "flipped"):
        damage(path, {"truncated": "half", "flipped": "flip"}[problem])
    elif problem == "foreign":
        torch.save({"model": models.build_model("tiny_dropout_mlp").state_dict()}, path)
    before = files(out)
    capsys.readouterr()
    assert train_cli.main(["--config", str(config), "epochs=2", "--resume", str(path)]) == 1
    message = capsys.readouterr().out
    reason = {"truncated": "truncated", "flipped": "checksum mismatch", "missing": "no such checkpoint file",
              "directory": "no such checkpoint file", "foreign": "not a ctkd run checkpoint"}[problem]
    assert str(path) in message and reason in message
    assert files(out) == before


# ------------------------------------------------------------------------------------------------ retention
def test_keep_last_keeps_the_newest_and_never_the_resumed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str]
) -> None:
    """A5: keep_last 3 with a checkpoint every step: after each save exactly the newest 3 (plus last.pth, a copy of
    the newest, and best.pth); a failed delete is logged and done at a later save; a run resumed from an older
    checkpoint keeps that one, and sets the newer ones aside."""
    listings = []
    real_save = CheckpointSeries.save

    def save(self, state, position, **kwargs):  # noqa: ANN001, ANN202
        path = real_save(self, state, position, **kwargs)
        listings.append(([p.name for _, p in series.series(self.directory)], path.name))
        assert (self.directory / "last.pth").read_bytes() == path.read_bytes()
        return path

    real_unlink, refused = Path.unlink, []

    def unlink(self, missing_ok=False):  # noqa: ANN001, ANN202 - the first delete of e1 s2 fails
        if self.name == "ckpt-e0001-s000002.pth" and not refused:
            refused.append(self)
            raise PermissionError("read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(CheckpointSeries, "save", save)
    monkeypatch.setattr(Path, "unlink", unlink)
    cfg = load(dropout_config(tmp_path, "run", epochs=2, checkpoint={"every_steps": 1, "keep_last": 3}), tmp_path)
    run(cfg)
    saved = [name for _, name in listings]
    assert len(saved) == 10 and saved[-1] == "ckpt-e0002-s000005.pth"
    for number, (listing, _) in enumerate(listings):
        expected = saved[max(0, number - 2): number + 1]
        if number == 4:  # e1 s2's delete failed: it waits for the next save
            expected = ["ckpt-e0001-s000002.pth", *expected]
        assert listing == expected, number
    assert any("could not delete old checkpoint file" in line and "ckpt-e0001-s000002.pth" in line
               for line in messages)
    out = Path(cfg.output_dir)
    assert checkpoint_names(out) == ["best.pth", *saved[-3:], "last.pth"]

    older = out / "ckpt-e0002-s000003.pth"
    longer = load(dropout_config(tmp_path, "run", epochs=3, checkpoint={"every_steps": 1, "keep_last": 2}),
                  tmp_path, "longer.yaml")
    run(longer, resume=str(older))
    names = checkpoint_names(out)
    assert older.name in names  # the checkpoint resumed from is never pruned
    assert [n for n in names if n.startswith("ckpt-") and n.endswith(".pth")] == [
        older.name, "ckpt-e0003-s000004.pth", "ckpt-e0003-s000005.pth"]
    assert sum(n.startswith("ckpt-e0002-s000004.pth.superseded-") for n in names) == 1
    assert sum(n.startswith("ckpt-e0002-s000005.pth.superseded-") for n in names) == 1


def test_keeping_fewer_than_two_checkpoints_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last' is 1, but at least 2 .* resume from"):
        load(dropout_config(tmp_path, "run", checkpoint={"keep_last": 1}), tmp_path)


