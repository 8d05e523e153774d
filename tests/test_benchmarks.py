"""benchmarks/benchmark.py: a --quick end-to-end run on CPU (variants a, b, d, the pipeline table, --append)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import benchmark as bench
from benchmarks.data import synthetic_size
from benchmarks.report import images_cell
from benchmarks.results import Timing
from benchmarks.rounds import Entry, measure_rounds
from conftest import REPO_ROOT

# the script as a user runs it: `python benchmarks/benchmark.py` from the repository root, the root not on the path
SCRIPT_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
ROW_LABELS = ("a: reference loop", "b: ctkd defaults", "d: KD, fixed τ", "d: CTKD, global τ", "d: CTKD, instance τ")




def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """A table cell's leading number ('1,234.5', '75.36 (fp32)')."""
    match = re.match(r"-?[\d,]*\.?\d+", cell)
    assert match, cell
    return float(match.group(0).replace(",", ""))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[str]]:
    """One --quick run of the script (stdout, the appended file, the arguments)."""
    appended = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    appended.write_text("# Measurements\n\nearlier content\n", encoding="utf-8")
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--pairs", "resnet8:resnet8", "--batch-size", "8",
            "--warmup", "2", "--steps", "3", "--workers", "0", "--variants", "a,b,d", "--pipeline",
            "--append", str(appended)]
    done = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", *argv],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, env=SCRIPT_ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, appended, argv


@pytest.mark.slow
def test_table_has_a_row_per_variant_with_positive_numbers(quick_run: tuple[str, Path, list[str]]) -> None:
    stdout, _, _ = quick_run
    rows = table_rows(stdout, "pair")
    assert [row[1] for row in rows] == list(ROW_LABELS)
    for row in rows:
        assert row[0] == "resnet8 → resnet8"
        images_per_s, step_ms, memory, gflop, tflops, share = (number(cell) for cell in row[3:9])
        assert images_per_s > 0 and step_ms > 0 and gflop > 0 and tflops > 0 and share > 0, row
        assert memory >= 0, row
        # the step time and the throughput describe the same window: batch 8 images per step
        assert images_per_s * step_ms / 1000 == pytest.approx(8, rel=0.02), row
    assert "synthetic (100 classes, 32 training images" in stdout  # 4 batches: the timed steps cross an epoch
    relative = {row[1]: row[9] for row in rows}
    assert relative["a: reference loop"] == "reference" and relative["b: ctkd defaults"].endswith("× a")
    assert "vs fixed τ" in relative["d: CTKD, instance τ"]


def test_the_added_work_of_a_learnable_tau_is_timed_alone(quick_run: tuple[str, Path, list[str]]) -> None:
    stdout, _, _ = quick_run
    rows = {row[0]: row for row in table_rows(stdout, "temperature")}
    assert list(rows) == ["fixed", "global", "instance"]
    assert all(number(row[1]) > 0 for row in rows.values())
    assert rows["fixed"][2] == "—" and re.fullmatch(r"[+-]\d+\.\d{3}", rows["global"][2])
    assert rows["global"][3].startswith("resnet8 → resnet8: ") and rows["global"][3].endswith(" %")


def test_pipeline_table_compares_per_image_and_batched_transforms(quick_run: tuple[str, Path, list[str]]) -> None:
    stdout, _, _ = quick_run
    rows = table_rows(stdout, "pipeline")
    assert len(rows) == 3  # PIL per image, ctkd batched in the main process, ctkd's loader (no CUDA row on CPU)
    assert "PIL" in rows[0][0] and "train_transform" in rows[1][0] and "build_loader" in rows[2][0]
    assert all(number(row[1]) > 0 for row in rows)


def test_appended_section_names_the_command_and_machine(quick_run: tuple[str, Path, list[str]]) -> None:
    stdout, appended, argv = quick_run
    text = appended.read_text(encoding="utf-8")
    assert text.startswith("# Measurements\n\nearlier content\n\n## Training throughput, ")
    section = text.split("## Training throughput, ", 1)[1]
    assert f"Command: `python benchmarks/benchmark.py {' '.join(argv)}`" in section
    assert "torch " in section and "GPU: none" in section
    assert table_rows(section, "pair") == table_rows(stdout, "pair")


def test_options_are_checked_and_defaults_follow_quick() -> None:
    parser = bench.build_parser()
    args = bench.resolve_args(parser.parse_args([]))
    assert (args.warmup, args.steps, args.workers, args.batch_size) == (20, 100, 2, 64)
    assert bench.parse_pairs(args.pairs) == [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")]
    assert synthetic_size(args) == 5056  # 5,000 rounded up to whole batches of 64
    quick = bench.resolve_args(parser.parse_args(["--quick", "--steps", "7"]))
    assert (quick.warmup, quick.steps) == (2, 7)  # an explicit value wins over --quick's
    with pytest.raises(SystemExit):
        bench.resolve_args(parser.parse_args(["--variants", "a,e"]))
    with pytest.raises(SystemExit):
        bench.parse_pairs("resnet56-resnet20")
    with pytest.raises(SystemExit, match="Did you mean.*resnet20"):
        bench.parse_pairs("resnet56:resnet2O")


@pytest.mark.slow
def test_rounds_alternate_the_variants_and_report_the_median() -> None:
    """--rounds: each round measures every variant once, in turn; a row is the median round with the range."""
    calls: list[str] = []

    def measuring(label: str, images_per_s: list[float]):
        def measure():
            calls.append(label)
            return Timing(steps=1, images=int(images_per_s.pop(0)), seconds=1.0, peak_bytes=0)
        return measure

    entries = [Entry("b", "b", measuring("b", [100, 300, 200]), lambda _: ""),
               Entry("d", "d", measuring("d", [50, 40, 60]), lambda _: "")]
    measure_rounds(entries, 3, torch.device("cpu"))
    assert calls == ["b", "d"] * 3
    median = entries[0].median()
    assert median.images_per_s == 200 and median.info["rounds"] == [100, 300, 200]
    assert images_cell(median) == "200.0 (100–300)"
    assert entries[1].median().images_per_s == 50
    assert images_cell(Timing(steps=1, images=64, seconds=1.0, peak_bytes=0)) == "64.0"  # one round
    parser = bench.build_parser()
    assert bench.resolve_args(parser.parse_args([])).rounds == 3
    assert bench.resolve_args(parser.parse_args(["--quick"])).rounds == 1
    with pytest.raises(SystemExit):
        bench.resolve_args(parser.parse_args(["--rounds", "0"]))


def test_a_failing_round_is_reported_and_the_others_still_count() -> None:
    outcomes = [100.0, RuntimeError("CUDA out of memory. Tried to allocate"), 300.0]

    def measure():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return Timing(steps=1, images=int(outcome), seconds=1.0, peak_bytes=int(outcome))

    entry = Entry("c", "c", measure, lambda _: "")
    measure_rounds([entry], 3, torch.device("cpu"))
    assert [t.images_per_s for t in entry.timings] == [100, 300]
    assert entry.errors == ["RuntimeError: CUDA out of memory. Tried to allocate"]
    assert entry.median().peak_bytes == 300  # the largest peak of the rounds


# ------------------------------------------------------------------------------------------ benchmarks/method_steps
@pytest.mark.slow
def test_method_steps_times_each_method_beside_kd(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One row per method, KD first with ratio 1, positive times and FLOPs, head parameters only where heads exist."""
    from benchmarks import method_steps

    out = tmp_path / "bench.md"
    assert method_steps.main(["--pair", "resnet14:resnet8", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                              "--rounds", "1", "--methods", "vid", "pkt", "--append", str(out)]) == 0
    rows = table_rows(out.read_text(), "method")
    assert [row[0] for row in rows] == ["kd", "vid", "pkt"]
    assert rows[0][2] == "1.00" and rows[0][4] == "1.00"
    assert all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)
    heads = {row[0]: int(row[5].replace(",", "")) for row in rows}
    assert heads["kd"] == heads["pkt"] == 0 < heads["vid"]
    assert "resnet14 → resnet8, batch 4" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ benchmarks/crd_scores
def test_crd_scores_times_both_ways_and_names_the_path_contrast_scores_takes() -> None:
    from benchmarks import crd_scores

    sizes = (("small", 1000, 2), ("huge", 8 * (1 + crd_scores.NCE_K) + 1, 1))
    rows = table_rows(crd_scores.table(1, sizes), "data")
    assert [row[0] for row in rows] == ["small", "huge"]
    assert all(float(row[3]) >= 0 and float(row[4]) >= 0 for row in rows)
    assert [row[5] for row in rows] == ["dense", "gathered"]  # the rule of ctkd.methods.crd.contrast_scores
