"""Folding a frozen network's BatchNorm layers into the convolutions that feed them.

In eval mode a BatchNorm is a per-channel affine map, y = γ (x − μ) / √(σ² + ε) + β, so a convolution whose output
goes straight into it can absorb it: W' = W · γ/√(σ² + ε) per output channel and b' = (b − μ) · γ/√(σ² + ε) + β.
The folded network computes the same function up to float rounding with one pass over each activation fewer, which
is what a teacher that never trains wants (a third to a half of a CIFAR distillation step is its forward).

Pairs are found by running the network once with hooks (a BatchNorm whose every input was the output of one and the
same convolution), never by names, so the zoo, torchvision and timm networks need nothing declared. Because a hook
cannot see a convolution's output used elsewhere as well, the folded network is then compared with the original on
random images through every entry point the caller names; a fold that changes them beyond rounding is undone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# An entry point to compare: a function of (network, images) returning a tensor or nested lists/tuples of tensors.
EntryPoint = Callable[[nn.Module, Tensor], Any]


def _foldable_pairs(model: nn.Module, example: Tensor, entry_points: Sequence[EntryPoint]) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm's input was, in every call, that conv's output."""
    names = {module: name for name, module in model.named_modules()}
    produced_by: dict[int, tuple[Tensor, nn.Conv2d]] = {}  # id(output) → (output kept alive, conv)
    fed_by: dict[nn.BatchNorm2d, set[nn.Conv2d | None]] = {}

    def record_conv(module: nn.Module, _args: Any, output: Tensor) -> None:
        produced_by[id(output)] = (output, module)  # the tensor is kept so its id is not reused during the pass

    def record_bn(module: nn.Module, args: tuple[Any, ...]) -> None:
        source = produced_by.get(id(args[0])) if args else None  # called with a keyword argument: not foldable
        fed_by.setdefault(module, set()).add(source[1] if source is not None and source[0] is args[0] else None)

    handles = []
    for module in model.modules():
        # exact types (timm's BatchNormAct2d, a parametrized conv, ... may do more) and no hooks of their own (old
        # weight_norm computes the weight in one; a BatchNorm's hooks would be lost with it)
        if _has_hooks(module):
            continue
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(record_conv))
        elif type(module) is nn.BatchNorm2d:
            handles.append(module.register_forward_pre_hook(record_bn))
    try:
        with torch.no_grad():
            for entry in entry_points:
                entry(model, example)
                produced_by.clear()
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn, sources in fed_by.items():
        (conv,) = sources if len(sources) == 1 else (None,)
        if conv is not None and bn.track_running_stats and bn.running_mean is not None:
            pairs.append((names[conv], names[bn]))
    convs = [conv for conv, _ in pairs]
    return [pair for pair in pairs if convs.count(pair[0]) == 1]  # a conv feeding two BNs keeps both


def _has_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward hooks or pre-hooks registered (by its library or its user)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> Callable[[], None]:
    """Fold one BatchNorm into its conv in place (the BatchNorm becomes an nn.Identity); returns the undo."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    weight, bias = conv.weight, conv.bias
    conv.weight, conv.bias = fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                                  bn.bias)
    _set_submodule(model, bn_name, nn.Identity())

    def undo() -> None:
        conv.weight, conv.bias = weight, bias
        _set_submodule(model, bn_name, bn)

    return undo


def _flat_tensors(output: Any) -> list[Tensor]:
    """The tensors of an entry point's output, in order (lists, tuples and dict values; anything else is skipped)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flat_tensors(item)]
    return []


def _outputs(model: nn.Module, example: Tensor, entry_points: Sequence[EntryPoint]) -> list[list[Tensor]]:
    """Every entry point's output tensors on `example` (copies: a network may return a buffer it later updates)."""
    with torch.no_grad():
        return [[t.detach().clone() for t in _flat_tensors(entry(model, example))] for entry in entry_points]


def _same_outputs(got: list[list[Tensor]], expected: list[list[Tensor]]) -> bool:
    """Whether two `_outputs` agree up to float rounding (relative to each tensor's largest value)."""
    for outs_a, outs_b in zip(expected, got, strict=True):
        if len(outs_a) != len(outs_b):
            return False
        for x, y in zip(outs_a, outs_b):
            scale = x.abs().max().item() if x.numel() else 0.0
            if x.shape != y.shape or (x - y).abs().max().item() > 1e-4 * scale + 1e-6:
                return False
    return True


def fold_batchnorm(model: nn.Module, example: Tensor, entry_points: Sequence[EntryPoint] | None = None) -> int:
    """Fold the eval-mode `model`'s BatchNorms into their convolutions in place; returns how many were folded.

    `example`: a small batch of the model's input shape (its values do not matter). `entry_points`: how the model
    will be called (default: ``model(x)``); each is checked to compute the same outputs after folding, and only the
    folds that leave them unchanged are kept. Call it on a frozen network only: a folded network cannot be trained.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: a training BatchNorm uses batch statistics")
    entry_points = list(entry_points) if entry_points else [lambda net, x: net(x)]
    pairs = _foldable_pairs(model, example, entry_points)
    if not pairs:
        return 0
    expected = _outputs(model, example, entry_points)
    undos = [_fold_pair(model, *pair) for pair in pairs]
    if _same_outputs(_outputs(model, example, entry_points), expected):
        return len(pairs)
    for undo in reversed(undos):  # some conv's output is also used elsewhere: find which pairs are safe, one by one
        undo()
    folded = 0
    for pair in pairs:
        undo = _fold_pair(model, *pair)
        if _same_outputs(_outputs(model, example, entry_points), expected):
            folded += 1
        else:
            undo()
    return folded
