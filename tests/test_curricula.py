"""ctkd/curricula: the λ schedules pinned to the paper (Eq. 11, its λ table) and the authors' code."""
from __future__ import annotations

import math

import pytest

from ctkd.curricula import build_curriculum, curriculum_options

# docs/method.md, λ per epoch: E_loops = 10 (1-based epochs, as the authors' code).
PAPER_LAMBDA_TABLE = [0.0245, 0.0955, 0.2061, 0.3455, 0.5000, 0.6545, 0.7939, 0.9045, 0.9755, 1.0]


# ---------------------------------------------------------------- curriculum
def test_cosine_curriculum_matches_paper_table() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=10))
    got = [round(lam(epoch), 4) for epoch in range(1, 11)]
    assert got == PAPER_LAMBDA_TABLE
    assert lam(11) == 1.0 and lam(240) == 1.0


def test_cosine_curriculum_equals_authors_code_with_sign_flipped() -> None:
    """Our λ equals −CosineDecay(max=0, min=−1, loops=L).get_value(epoch) of the authors' code (docs/differences.md)."""

    def authors_value(i: int, max_value: float = 0.0, min_value: float = -1.0, loops: int = 10) -> float:
        i = min(max(i, 0), loops)
        return (math.cos(math.pi * i / loops) + 1) / 2 * (max_value - min_value) + min_value

    for loops in (5, 10):
        lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=loops))
        for epoch in range(1, 30):
            assert lam(epoch) == pytest.approx(-authors_value(epoch, loops=loops), abs=1e-12)


def test_cosine_curriculum_imagenet_setting() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=5))
    assert [round(lam(e), 4) for e in range(1, 7)] == [0.0955, 0.3455, 0.6545, 0.9045, 1.0, 1.0]


def test_cosine_curriculum_respects_min_and_max_and_never_decreases() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.2, lambda_max=0.8, loops=4))
    values = [lam(e) for e in range(0, 10)]
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))  # Eq. 10


def test_linear_curriculum_is_a_correct_ramp() -> None:
    lam = build_curriculum(curriculum_options("linear", lambda_min=0.0, lambda_max=1.0, loops=10))
    assert [lam(e) for e in (1, 5, 10, 11)] == pytest.approx([0.1, 0.5, 1.0, 1.0])  # the authors' stops at 0.9
    shifted = build_curriculum(curriculum_options("linear", lambda_min=0.5, lambda_max=1.0, loops=5))
    assert shifted(0) == pytest.approx(0.5) and shifted(5) == pytest.approx(1.0)


def test_constant_curriculum() -> None:
    lam = build_curriculum(curriculum_options("constant", lambda_max=0.7))
    assert lam(1) == lam(100) == 0.7


def test_curriculum_rejects_bad_bounds_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="lambda_min"):
        build_curriculum(curriculum_options("cosine", lambda_min=0.5, lambda_max=0.1, loops=10))
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        curriculum_options("cosin")
