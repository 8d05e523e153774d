"""A Comprehensive Overhaul of Feature Distillation (OFD; Heo et al., ICCV 2019) as a ctkd method.

Both networks give their stage outputs *before* the final ReLU (``preact``): ``features[1:-1]``, the stem and the
pooled vector left out, as mdistiller's ``preact_feats[1:]``; when the lists differ in length the last stages are
paired (mdistiller's ``_align_list``). Per pair, a connector r (k×k conv + BN, from the student's channels to the
teacher's) transforms the student's map, the teacher's map is average-pooled to the student's size (mdistiller), the
teacher transform is the margin ReLU σ_m(t) = max(t, m) and the distance the paper's partial L2:

    d_p(T, S) = Σ_{c,h,w} 0 where S ≤ T ≤ 0, (T − S)² elsewhere,   T = max(t, m_c),

summed over the pair's elements and averaged over the batch. Pair i of n weighs 1/2^(n−i−1) (the deepest 1, each
shallower one half; both authors' codes), and the sum is times β = 1e-3 (mdistiller FEAT_WEIGHT; clovaai's CIFAR
script divides by the batch and by 1000).

The margin m_c of teacher channel c is the expected value of the negative part of that channel's pre-activation
under the paper's assumption that it is Gaussian with the mean β_c and the standard deviation |γ_c| of the BatchNorm
that produces it (the paper's teacher transform): m = E[x | x < 0] = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|), or −3|γ| where
Φ(−β/|γ|) ≤ 0.001 (the authors' ``get_margin_from_BN``). The margins are buffers of the trainable module
(checkpointed, never trained), read from the teacher as loaded, before `runtime.fold_teacher_bn` folds its
BatchNorms away.

Which BatchNorm produces a stage's pre-activation is found by one rule for every model, on a probe batch (see
`locate_stage_batchnorms`): the BN whose output reaches the feature unchanged — through additions, concatenations
and slicing only, so that ∂feature/∂(BN output) is the identity on that channel — and, where two do (a ResNet block
whose projection shortcut also ends in a BN), the deeper one (the one that depends on more BNs: the residual branch).
On the CIFAR zoo this is exactly the authors' ``get_bn_before_relu``: ResNet ``layerK[-1].bn2``, WRN
``block2.layer[0].bn1``/``block3.layer[0].bn1``/``bn1``, VGG ``blockK[-1]``, MobileNetV2 ``blocks[g][-1].conv[-1]``;
ShuffleV1 gets its last unit's ``bn3``; a ShuffleV2 teacher is refused (half of each stage pre-activation is a
pass-through that no BN produces).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec

CDF_FLOOR = 0.001  # get_margin_from_BN: below this mass of negative values the margin is −3|γ| instead
PROBE_SIZE = 32  # side of the probe images: the CIFAR zoo's input (the only models with pre-activation features)
_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    """Per channel E[x | x < 0] for x ~ N(β, γ²) (the paper's margin, in float64), −3|γ| where P(x < 0) ≤ 0.001.

    A channel with γ = 0 is the constant β: its margin is β when β < 0, else 0 (the limits of both branches; the
    authors' code divides by zero there)."""
    std, mean = gamma.detach().double().abs(), beta.detach().double()
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    z = mean / safe_std
    negative_mass = torch.special.ndtr(-z)  # Φ(−β/|γ|) = P(x < 0)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # φ(β/|γ|)
    expected = mean - safe_std * density / negative_mass.clamp(min=CDF_FLOOR)  # clamped: the branch not taken
    margin = torch.where(negative_mass > CDF_FLOOR, expected, -3 * std)
    return torch.where(std > 0, margin, mean.clamp(max=0)).float()


def stage_weights(n: int) -> list[float]:
    """1/2^(n−i−1) for pair i = 0 … n − 1 (clovaai's and mdistiller's OFD): 1 for the deepest, halved per stage up."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """The paper's partial L2 d_p(max(t, m), s) of one pair, summed over channels and positions, batch-averaged.

    Zero where the student is at or below the transformed teacher and that is ≤ 0 (both would be cut by the ReLU);
    as mdistiller's three-case ``feat_loss``, since m ≤ 0 makes ``target > 0`` the same as ``teacher > 0``.
    """
    target = torch.maximum(teacher, margin.to(teacher.dtype).view(1, -1, 1, 1))
    keep = (student > target) | (teacher > 0)
    return ((student - target).pow(2) * keep).sum() / student.shape[0]


def connector(student_channels: int, teacher_channels: int, kernel: int) -> nn.Sequential:
    """The student transform r: k×k conv (no bias, 'same' padding) + BN, initialised as the authors' connector."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel, padding=(kernel - 1) // 2, bias=False)
    # N(0, 2/(k·k·C_t)) as both codes write by hand; the BN keeps PyTorch's γ = 1, β = 0, which they set too
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * teacher_channels)))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def ofd_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], connectors: nn.ModuleList, margins: Sequence[Tensor]
) -> Tensor:
    """Σ_i d_p(σ_m(pool(t_i)), r_i(s_i)) / B / 2^(n−i−1) over the aligned stage pairs (not yet times β)."""
    total = student[0].new_zeros(())
    for weight, s, t, conn, margin in zip(stage_weights(len(connectors)), student, teacher, connectors, margins):
        connected = conn(s.float()).float()
        target = t.detach().float()
        if target.shape[-2:] != connected.shape[-2:]:  # mdistiller pools the teacher's map to the student's size
            target = F.adaptive_avg_pool2d(target, connected.shape[-2:])
        total = total + weight * partial_l2(connected, target, margin)
    return total


# ------------------------------------------------------------------------ locating the BatchNorm of each stage
@dataclass
class _BatchNormCall:
    """One BatchNorm call of the probe forward: the module, its own output, and the zero added to that output."""

    module: nn.Module
    output: Tensor
    delta: Tensor  # a zero leaf: the gradient reaching it is the gradient w.r.t. the BN's output


def _probe(teacher: nn.Module) -> tuple[list[Tensor], list[_BatchNormCall]]:
    """Pre-activation features of the teacher (eval mode, with graph) on seeded noise, and every BN call in order.

    Each BN's output gets a zero leaf added by a forward hook, so autograd can tell which BN outputs reach a feature
    and how; the values (and the teacher's mode, parameters and statistics) do not change."""
    calls: list[_BatchNormCall] = []

    def hook(module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        delta = torch.zeros_like(output, requires_grad=True)
        calls.append(_BatchNormCall(module, output, delta))
        return output + delta

    device = next(teacher.parameters()).device
    images = torch.randn(2, 3, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    images = images.to(device).requires_grad_()
    handles = [m.register_forward_hook(hook) for m in teacher.modules() if isinstance(m, _BATCHNORMS)]
    was_training = teacher.training
    try:
        teacher.eval()
        with torch.enable_grad():
            features, _ = teacher.forward_with_features(images, preact=True)
    finally:
        teacher.train(was_training)
        for handle in handles:
            handle.remove()
    return features, calls


def _random_like(x: Tensor, seed: int) -> Tensor:
    """Seeded standard normal values shaped like x (distinct almost surely: exact matches identify channels)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype).to(x.device)


def _identity_sources(feature: Tensor, calls: list[_BatchNormCall]) -> list[list[tuple[int, int]]]:
    """Per channel c of `feature`: the (call, BN channel) pairs whose output reaches channel c by identity.

    With a random weighting W, ∂⟨W, feature⟩/∂(BN output) equals W[:, c] exactly on BN channel j only if that channel
    reaches feature channel c through additions, concatenation or slicing alone (any conv, ReLU or second path
    changes it)."""
    weight = _random_like(feature, seed=1)
    # only BN outputs of the feature's spatial size can reach it by identity: the backward stops at the stage start
    indices = [i for i, c in enumerate(calls) if c.delta.shape[2:] == feature.shape[2:]]
    grads = torch.autograd.grad((feature * weight).sum(), [calls[i].delta for i in indices], retain_graph=True,
                                allow_unused=True)
    sources: list[list[tuple[int, int]]] = [[] for _ in range(feature.shape[1])]
    for index, grad in zip(indices, grads):
        if grad is None:
            continue
        candidates = grad[0, :, 0, 0, None] == weight[None, 0, :, 0, 0]  # (BN channels, feature channels)
        for j, c in candidates.nonzero().tolist():
            if torch.equal(grad[:, j], weight[:, c]):
                sources[c].append((index, j))
    return sources


def _depth(index: int, calls: list[_BatchNormCall]) -> int:
    """How many earlier BN outputs the output of BN call `index` depends on (its depth in BatchNorm layers)."""
    earlier = [c.delta for c in calls[:index]]
    if not earlier:
        return 0
    output = calls[index].output
    grads = torch.autograd.grad((output * _random_like(output, seed=2)).sum(), earlier, retain_graph=True,
                                allow_unused=True)
    return sum(1 for g in grads if g is not None and bool(g.any()))


def _stage_batchnorm(
    feature: Tensor, calls: list[_BatchNormCall], model: str, stage: int
) -> tuple[Tensor, Tensor]:
    """(γ, β) per channel of `feature` from the BN that produces it (the deepest one where several do)."""
    sources = _identity_sources(feature, calls)
    missing = [c for c, found in enumerate(sources) if not found]
    if missing:
        raise ConfigError(
            f"method ofd: {len(missing)} of the {len(sources)} channels of stage {stage}'s pre-activation feature of "
            f"the teacher ({model}; channel {missing[0]} first) are not the output of any BatchNorm, so OFD's margin "
            "(E[x | x < 0] from that BatchNorm's γ and β, Heo et al.) is undefined there (ShuffleV2 passes half "
            "of each unit's channels through). Use a teacher whose stage pre-activations are BatchNorm outputs "
            "(resnet*, wrn_*, vgg*, MobileNetV2, ShuffleV1), or another method"
        )
    depths: dict[int, int] = {}
    gammas, betas = [], []
    for found in sources:
        for index, _ in found:
            if len(found) > 1 and index not in depths:
                depths[index] = _depth(index, calls)
        index, j = max(found, key=lambda source: (depths.get(source[0], 0), source[0]))
        bn = calls[index].module
        gammas.append(bn.weight[j] if bn.weight is not None else torch.ones(()))
        betas.append(bn.bias[j] if bn.bias is not None else torch.zeros(()))
    return torch.stack(gammas).detach().cpu(), torch.stack(betas).detach().cpu()


def locate_stage_batchnorms(teacher: nn.Module, stages: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """(γ, β) per channel, for each index in `stages` of ``forward_with_features(preact=True)``'s list, of the
    BatchNorm whose output that pre-activation feature is (the rule in the module docstring)."""
    features, calls = _probe(teacher)
    model = type(teacher).__name__
    return [_stage_batchnorm(features[k], calls, model, k) for k in stages]


@METHODS.register("ofd")
class OFD(Method):
    """γ·CE + α·KD(τ) + β·Σ_i d_p(σ_m(t_i), r_i(s_i)) / B / 2^(n−i−1) on the stage pre-activations."""

    paper = "Heo et al., ICCV 2019"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β and the connector's kernel size."""

        name: str = "ofd"
        weight: float = spec(1e-3, ge=0)  # β: mdistiller CFG.OFD.LOSS.FEAT_WEIGHT (clovaai CIFAR: sum / B / 1000)
        connector_kernel: int = spec(1, ge=1)  # mdistiller CFG.OFD.CONNECTOR.KERNEL_SIZE (clovaai: always 1×1)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.connector_kernel % 2 == 0:  # 'same' padding (k − 1)/2 keeps the size only for odd k
                raise ConfigError(
                    f"method.connector_kernel = {self.connector_kernel} must be odd (1, 3, ...): the connector's "
                    "padding (k - 1) / 2 keeps the student's spatial size only for an odd kernel"
                )

    features = True
    preact = True
    min_samples_per_rank = 2  # the connectors' BatchNorm cannot normalise a single sample in training mode

    def build_heads(self, setup: MethodSetup) -> None:
        """A connector per aligned stage pair, and the teacher's margins per channel as buffers."""
        student, teacher = self.stage_shapes(setup)
        kernel = self.options.connector_kernel
        self.connectors = nn.ModuleList(connector(s[0], t[0], kernel) for s, t in zip(student, teacher))
        first = len(setup.teacher_feature_shapes) - 1 - len(teacher)  # index of the first paired teacher stage
        stages = range(first, first + len(teacher))
        located = locate_stage_batchnorms(self._teacher(setup), stages)
        for i, ((gamma, beta), shape) in enumerate(zip(located, teacher)):
            if gamma.shape[0] != shape[0]:
                raise ValueError(f"OFD: the teacher's stage {stages[i]} has {gamma.shape[0]} channels, but "
                                 f"MethodSetup.teacher_feature_shapes says {shape[0]}: not measured on this teacher")
            self.register_buffer(f"margin_{i}", bn_margin(gamma, beta))

    @staticmethod
    def stage_shapes(setup: MethodSetup) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Per-sample shapes of the paired stage features: the last n of each network's ``features[1:-1]``."""
        student, teacher = setup.student_feature_shapes[1:-1], setup.teacher_feature_shapes[1:-1]
        n = min(len(student), len(teacher))
        if n == 0 or any(len(shape) != 3 for shape in student[-n:] + teacher[-n:]):
            raise ValueError("OFD needs stage outputs (C, H, W feature maps) from both student and teacher")
        return student[-n:], teacher[-n:]

    @staticmethod
    def _teacher(setup: MethodSetup) -> nn.Module:
        """The loaded teacher, which must give pre-activation features (checked before training, by name)."""
        if setup.teacher is None:
            raise ValueError("OFD reads the teacher's BatchNorms: MethodSetup.teacher must be the loaded teacher")
        if not getattr(setup.teacher, "supports_preact", False):
            raise ConfigError(
                f"method ofd distils pre-activation features, which the teacher ({type(setup.teacher).__name__}) "
                "does not provide; use a teacher of the CIFAR zoo (resnet*, wrn_*, vgg*, MobileNetV2, ShuffleV1)"
            )
        return setup.teacher

    def margins(self) -> list[Tensor]:
        """m per teacher channel of each stage pair, shallowest first (fixed buffers)."""
        return [getattr(self, f"margin_{i}") for i in range(len(self.connectors))]

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·Σ_i d_p(σ_m(t_i), r_i(s_i)) / B / 2^(n−i−1); per-sample, so no gathering across ranks."""
        n = len(self.connectors)
        student, teacher = step.student_features[1:-1][-n:], step.teacher.features[1:-1][-n:]
        return {"loss_ofd": self.options.weight * ofd_loss(student, teacher, self.connectors, self.margins())}
