"""CRD's contrast scores both ways (ctkd.methods.crd): gathering the bank rows against one product with the whole bank.

    python -m benchmarks.crd_scores                       # CIFAR-100 (N = 50,000) and ImageNet (N = 1,281,167) sizes
    python -m benchmarks.crd_scores --append docs/benchmarks.md

One side of CRD's loss at the authors' settings (K = 16,384 negatives, 128-dimensional embeddings): the scores
⟨v_i, bank[contrast_ij]⟩ of a batch and their backward to v, timed for `gathered_products` (copies B·(1+K)·D floats)
and `dense_products` (v·bankᵀ, then a pick), with the path `contrast_scores` takes at that size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.report import publish
from ctkd.methods.crd import dense_products, gathered_products, scores_densely

SIZES = (("CIFAR-100", 50_000, 64), ("ImageNet", 1_281_167, 256))  # (dataset, bank rows N, global batch B)
NCE_K, FEAT_DIM = 16_384, 128


def seconds(products: Callable[[Tensor, Tensor, Tensor], Tensor], bank: Tensor, contrast: Tensor,
            rounds: int) -> float:
    """Median seconds of forward + backward to the embeddings over `rounds` rounds (after one warm-up)."""
    times = []
    for _ in range(rounds + 1):
        v = torch.nn.functional.normalize(torch.randn(contrast.shape[0], bank.shape[1]), dim=1).requires_grad_()
        start = time.perf_counter()
        products(v, bank, contrast).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def table(rounds: int, sizes: tuple[tuple[str, int, int], ...]) -> str:
    """Both ways at each size, as a markdown table."""
    lines = [f"CRD scores, one side, forward + backward (CPU, {torch.get_num_threads()} threads, K = {NCE_K}, "
             f"D = {FEAT_DIM}, median of {rounds}; `python -m benchmarks.crd_scores`):", "",
             "| data | bank rows N | batch B | gathered (ms) | dense (ms) | path taken |", "|---|---|---|---|---|---|"]
    for name, rows, batch in sizes:
        bank = torch.nn.functional.normalize(torch.randn(rows, FEAT_DIM), dim=1)
        contrast = torch.randint(0, rows, (batch, 1 + NCE_K))
        gathered = seconds(gathered_products, bank, contrast, rounds)
        dense = seconds(dense_products, bank, contrast, rounds)
        path = "dense" if scores_densely(rows, 1 + NCE_K) else "gathered"
        lines.append(f"| {name} | {rows:,} | {batch} | {gathered * 1e3:.0f} | {dense * 1e3:.0f} | {path} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print and optionally append the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cifar-only", action="store_true", help="skip the ImageNet-sized bank (0.6 GiB)")
    parser.add_argument("--append", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    publish(table(args.rounds, SIZES[:1] if args.cifar_only else SIZES), args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
