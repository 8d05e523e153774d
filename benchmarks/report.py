"""The report: header lines, the main table with speed-ups, the other tables, and --append's section."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.memory import MIB
from benchmarks.results import FIXED_TAU_LABEL, Report, Row, Timing

REPO = Path(__file__).resolve().parents[1]
MAIN_HEADERS = ("pair", "variant", "settings", "images/s", "step (ms)", "peak memory (MiB)", "GFLOP/image",
                "achieved TFLOP/s", "% of peak", "relative")


def header_lines(
    info: dict[str, str], device: torch.device, data_description: str, args: argparse.Namespace,
    peaks: dict[str, float], peak_size: int, flops: dict[str, int],
) -> list[str]:
    """The report's first lines: machine, device and data, the peaks and FLOPs, what the memory column means."""
    return [
        f"machine: {info['cpu']}; GPU: {info['gpu']}; {info['software']}",
        f"device: {device}; data: {data_description}; batch {args.batch_size}; warm-up {args.warmup} steps, timed "
        f"{args.steps} steps; each row is the median of {args.rounds} round(s) in which the variants alternate "
        "(the range of images/s over the rounds in parentheses)",
        "matmul peak (" + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items())
        + f", {peak_size}² torch.mm); FLOPs per image = teacher forward + 3 × student forward: "
        + ", ".join(f"{pair} {value / 1e9:.3f} GFLOP" for pair, value in flops.items()),
        "peak memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                           else "peak RSS of the main process above its level at the variant's start")
        + " (the largest over the rounds)",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def images_cell(timing: Timing) -> str:
    """Images/s of the median round, with the range of all rounds when there were several."""
    rounds = timing.info.get("rounds", [])
    spread = f" ({min(rounds):,.0f}–{max(rounds):,.0f})" if len(rounds) > 1 else ""
    return f"{timing.images_per_s:,.1f}{spread}"


def main_rows(report: Report, flops: dict[str, int], peaks: dict[str, float]) -> list[list[str]]:
    """The main table's cells."""
    rows = []
    for row in report.rows:
        t, per_image = row.timing, flops[row.pair]
        achieved = per_image * t.images_per_s
        kind = "bf16" if row.bf16 and "bf16" in peaks else "fp32"
        rows.append([
            row.pair, row.label, row.settings, images_cell(t), f"{t.step_ms:,.2f}",
            f"{t.peak_bytes / MIB:,.1f}", f"{per_image / 1e9:.3f}", f"{achieved / 1e12:.4f}",
            f"{100 * achieved / peaks[kind]:.2f} ({kind})", row.relative,
        ])
    return rows


def add_relative(rows: list[Row]) -> None:
    """Speed-ups against variant a (or b), and d's step-time cost against fixed τ, per pair."""
    for pair in dict.fromkeys(r.pair for r in rows):
        mine = [r for r in rows if r.pair == pair]
        by = {r.label: r for r in mine}
        base = next((r for r in mine if r.variant == "a"), None) or next((r for r in mine if r.variant == "b"), None)
        fixed = by.get(FIXED_TAU_LABEL)
        for r in mine:
            if r.variant in "abc" and base is not None:
                ratio = r.timing.images_per_s / base.timing.images_per_s
                r.relative = "reference" if r is base else f"{ratio:.2f}× {base.variant}"
            elif r.variant == "d" and fixed is not None:
                cost = 100 * (r.timing.step_ms / fixed.timing.step_ms - 1)
                r.relative = "baseline of d" if r is fixed else f"{cost:+.1f} % step time vs fixed τ"


def render(report: Report, flops: dict[str, int], peaks: dict[str, float]) -> str:
    """Header lines and every table as Markdown."""
    parts = ["\n".join(f"- {line}" for line in report.header)]
    if report.rows:
        parts.append(markdown_table(MAIN_HEADERS, main_rows(report, flops, peaks)))
    for title, headers, rows in report.extra_tables:
        parts.append(f"{title}\n\n{markdown_table(headers, rows)}")
    return "\n\n".join(parts) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """The exact command, with the script's path as typed (relative to the repository when inside it)."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return "python " + shlex.join([str(script), *argv])


def publish(table: str, append: Path | None) -> None:
    """Print a benchmark's markdown table and, with --append, add it to that file after a blank line."""
    print(table)
    if append is not None:
        with Path(append).open("a", encoding="utf-8") as out:
            out.write("\n" + table)


def append_section(path: Path, body: str, info: dict[str, str], argv: Sequence[str]) -> None:
    """Append the report to `path` under a heading with the date and machine."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    gpu = info["gpu"] if info["gpu"] != "none" else "no GPU"
    heading = f"## Training throughput, {date}: {info['cpu'].split(' (')[0]}, {gpu}"
    lines = [heading, "", f"Command: `{command_line(argv)}`", ""]
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(separator + "\n".join(lines) + "\n" + body)
