"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020), a plug-in term beside γ·CE + α·KD(τ).

Student and teacher pooled vectors (`features[-1]`) are embedded by trainable linear heads and L2-normalised. Each
sample is contrasted with itself (the positive) and K negatives of other classes, drawn from two memory banks that
hold an embedding of every training sample: the teacher embedding against the *student* bank, the student embedding
against the *teacher* bank. Both sides use the NCE critic of the paper, h = P / (P + K/N) with P = exp(⟨v, m⟩/T) / Z
(N = training-set size, Z estimated once), and their losses add up. Settings in docs/settings.md (CRD row).

Under DDP every rank gathers the whole global batch (embeddings with gradient, dataset indices), computes the same
loss on it, estimates Z from it and applies the same bank update, so the banks stay identical on every rank and an
N-process run is the single-process run. Negatives come from a generator seeded by (run seed, epoch, step), so they
do not depend on the number of processes, on data-loader workers or on the global RNG, and a resumed run draws the
same ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctkd.datasets.hashing import seed_for
from ctkd.distributed import gather_batch
from ctkd.methods.base import METHODS, Method, MethodSetup, StepContext, StepInputs
from ctkd.options import MethodOptions, spec

NCE_EPS = 1e-7  # the authors' epsilon in both NCE log terms
Z_UNSET = -1.0  # a normalisation constant below 0 means "not estimated yet"
_BANK_STREAM = -1  # the seed_for "epoch" of the bank initialisation: no training epoch (they count from 1) uses it


def l2_normalize(x: Tensor) -> Tensor:
    """Rows divided by their Euclidean norm, without an epsilon, as the authors' embedding and bank update do."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


# A dense product with the whole bank beats gathering rows once the bank has at most this many rows per contrast
# column: the product runs at matmul speed, the gather copies B·(1+K)·D floats (docs/benchmarks.md, "CRD scores").
DENSE_ROWS_PER_COLUMN = 8


def gathered_products(v: Tensor, bank: Tensor, contrast: Tensor) -> Tensor:
    """⟨v_i, bank[contrast_ij]⟩ by copying the (B, 1+K, D) rows: the cheaper way for a bank much larger than 1+K."""
    rows = bank[contrast]  # a copy: the bank update after scoring cannot disturb autograd
    return torch.bmm(rows, v.unsqueeze(2)).squeeze(2)


def dense_products(v: Tensor, bank: Tensor, contrast: Tensor) -> Tensor:
    """⟨v_i, bank[contrast_ij]⟩ picked from v·bankᵀ (B, N): the faster way for a bank of a few times 1+K rows."""
    # autograd keeps the bank for v's gradient; a copy, since the bank is updated in place before backward
    return torch.mm(v, bank.clone().t()).gather(1, contrast)


def scores_densely(bank_rows: int, columns: int) -> bool:
    """Whether a bank of `bank_rows` rows is scored against `columns` = 1+K contrast columns by `dense_products`."""
    return bank_rows <= DENSE_ROWS_PER_COLUMN * columns


def contrast_scores(v: Tensor, bank: Tensor, contrast: Tensor, nce_t: float) -> Tensor:
    """Unnormalised scores exp(⟨v_i, bank[contrast_ij]⟩ / T): (B, D) embeddings vs (B, 1+K) bank rows → (B, 1+K)."""
    dense = scores_densely(bank.shape[0], contrast.shape[1])
    products = dense_products(v, bank, contrast) if dense else gathered_products(v, bank, contrast)
    return torch.exp(products / nce_t)


def nce_loss(probs: Tensor, n_data: int) -> Tensor:
    """NCE loss of normalised scores (B, 1+K), column 0 the positive; noise K·Pn with Pn = 1/N (uniform over data).

    With the critic h = P / (P + K·Pn) of Tian et al. (ICLR 2020): −(Σ_i log h(positive_i) + Σ_ik log(1 − h(neg_ik)))
    / B, where 1 − h is written K·Pn / (P + K·Pn) and both denominators get the authors' ε = 1e-7.
    """
    noise = (probs.shape[1] - 1) / n_data  # m·Pn with m = K
    positive = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / probs.shape[0]


class CRDState(nn.Module):
    """CRD's non-parameter state: the two memory banks, the two normalisation constants and the class tables.

    Banks and Z constants are persistent buffers (checkpointed as the run's "method_state"); the class tables are
    derived from the training labels and are rebuilt, not saved.
    """

    def __init__(self, train_targets: Tensor, feat_dim: int, seed: int) -> None:
        super().__init__()
        targets = train_targets.detach().to("cpu", torch.int64)
        n_data = targets.numel()
        counts = torch.bincount(targets) if n_data else torch.zeros(1, dtype=torch.int64)
        if int(counts.max()) == n_data:  # also catches an empty training set
            raise ValueError("CRD needs training samples of two classes or more (negatives are other-class samples)")
        # The authors' initialisation: uniform in ±1/sqrt(D/3). One generator seeded from the run seed: every rank
        # builds the same banks, and they do not share a random stream with the model initialisation.
        generator = torch.Generator().manual_seed(seed_for(seed, _BANK_STREAM))
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("z_s", torch.tensor(Z_UNSET))
        self.register_buffer("z_t", torch.tensor(Z_UNSET))
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("by_class", torch.argsort(targets, stable=True), persistent=False)  # indices, by class
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    @property
    def n_data(self) -> int:
        """N: the number of training samples (rows of each bank)."""
        return self.memory_s.shape[0]

    def contrast_indices(self, indices: Tensor, nce_k: int, seed: int) -> Tensor:
        """(B, 1+K) bank rows per sample: its own index, then K negatives from other classes ("exact" sampling).

        Negatives are uniform with replacement over the samples whose class differs from the anchor's, drawn without
        a Python loop: a draw r in [0, N − n_c) indexes the class-sorted table with the anchor's class block
        (n_c rows from its start) skipped. The raw draws come from a CPU generator seeded by `seed` alone, so they do
        not depend on the device or on the global RNG.
        """
        generator = torch.Generator().manual_seed(seed)
        # 62-bit draws reduced modulo (N − n_c): the modulo bias is below N / 2**62, i.e. nil.
        raw = torch.randint(0, 2**62, (indices.shape[0], nce_k), generator=generator)
        if indices.device.type == "cuda":  # pinned + non-blocking: the copy does not make the host wait for the GPU
            raw = raw.pin_memory()
        raw = raw.to(indices.device, non_blocking=True)
        cls = self.targets[indices]
        start, count = self.class_start[cls].unsqueeze(1), self.class_count[cls].unsqueeze(1)
        r = raw % (self.n_data - count)
        negatives = self.by_class[r + (r >= start) * count]
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    @torch.no_grad()
    def update_bank(self, bank: Tensor, indices: Tensor, v: Tensor, momentum: float) -> None:
        """Rows `indices` of `bank` ← normalize(m·row + (1 − m)·v), in place (the authors' momentum update)."""
        rows = bank.index_select(0, indices) * momentum + v.detach().to(bank.dtype) * (1 - momentum)
        bank.index_copy_(0, indices, l2_normalize(rows))


def normalized_scores(scores: Tensor, z: Tensor, n_data: int, *, store: bool) -> Tensor:
    """Scores divided by the side's constant Z, which is estimated once as mean(score)·N on the first batch.

    `torch.where` keeps the choice "estimate now or reuse" on the device: no host read, ever. The estimate is taken
    from detached scores, so Z never holds an autograd graph; with `store` (training) it is written into the state,
    from where the checkpoint restores it (a resumed run does not re-estimate it).
    """
    estimate = scores.detach().mean() * n_data
    value = torch.where(z < 0, estimate, z)
    if store:
        z.copy_(value)
    return scores / value


@METHODS.register("crd")
class CRD(Method):
    """CRD's embedding heads (trainable) and its NCE loss against two memory banks (the state)."""

    paper = "Tian et al., ICLR 2020"

    features = True

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """CRD's options; the defaults are the authors' (docs/settings.md)."""

        name: str = "crd"
        weight: float = spec(0.8, ge=0)  # β, the weight of the CRD loss
        feat_dim: int = spec(128, ge=1)  # embedding dimension of both heads and banks
        nce_k: int = spec(16384, ge=1)  # negatives per sample
        nce_t: float = spec(0.07, gt=0)  # temperature of the scores exp(⟨v, m⟩ / T)
        nce_m: float = spec(0.5, ge=0, lt=1)  # momentum of the bank update
        sampling: str = spec("exact", choices=("exact",))  # positive = the sample itself ("relax" not implemented)

    def build_heads(self, setup: MethodSetup) -> None:
        """The two embeddings, each flattening its network's pooled features (any feature shape works)."""
        options = self.options
        assert isinstance(options, CRD.Options)
        self.embed_s = nn.Linear(math.prod(setup.student_feature_shapes[-1]), options.feat_dim)
        self.embed_t = nn.Linear(math.prod(setup.teacher_feature_shapes[-1]), options.feat_dim)
        self.seed = setup.seed

    @classmethod
    def create_state(cls, options: MethodOptions, setup: MethodSetup) -> CRDState:
        """Two memory banks of N = len(train_targets) rows, Z constants unset."""
        assert isinstance(options, CRD.Options)
        return CRDState(setup.train_targets, options.feat_dim, setup.seed)

    def negatives_seed(self, ctx: StepContext) -> int:
        """The seed of step `ctx.step` of epoch `ctx.epoch`: a pure function of (run seed, epoch, step)."""
        return seed_for(seed_for(self.seed, ctx.epoch), ctx.step)

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·(student-side + teacher-side NCE loss) on the whole global batch; then the bank update (training)."""
        batch, features, teacher, state = step.batch, step.student_features, step.teacher, step.state
        assert isinstance(state, CRDState), "CRD needs its state (create_state)"
        size = batch.global_size
        v_s = gather_batch(l2_normalize(self.embed_s(features[-1].flatten(1).float())), size)
        v_t = gather_batch(l2_normalize(self.embed_t(teacher.features[-1].flatten(1).float())), size)
        indices = gather_batch(batch.indices, size)
        contrast = state.contrast_indices(indices, self.options.nce_k, self.negatives_seed(step.ctx))
        n, t, training = state.n_data, self.options.nce_t, self.training
        # the student embedding is scored against the teacher bank and vice versa (the authors' cross contrast)
        p_s = normalized_scores(contrast_scores(v_s, state.memory_t, contrast, t), state.z_s, n, store=training)
        p_t = normalized_scores(contrast_scores(v_t, state.memory_s, contrast, t), state.z_t, n, store=training)
        loss = nce_loss(p_s, n) + nce_loss(p_t, n)
        if training:  # only training steps move the banks
            state.update_bank(state.memory_s, indices, v_s, self.options.nce_m)
            state.update_bank(state.memory_t, indices, v_t, self.options.nce_m)
        return {"loss_crd": self.options.weight * loss}
