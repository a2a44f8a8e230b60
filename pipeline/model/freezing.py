"""Pure: freeze all but the top k blocks, and the optimizer's parameter groups with layer-wise LR decay."""

from __future__ import annotations

from torch import nn

from pipeline.model.backbones import cut_index

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def trainable_blocks(blocks: nn.ModuleList, k: int) -> list[nn.Module]:
    """The top k blocks, top first."""
    return list(blocks[cut_index(len(blocks), k):])[::-1]


def freeze_all_but_top(blocks: nn.ModuleList, k: int, bn_train: bool) -> None:
    """requires_grad only for the top k blocks; frozen blocks always run in eval mode.

    Unfrozen BatchNorm layers keep their pretrained running statistics unless bn_train: with
    small batches and small data, updating them usually hurts (the timm/fastai default for
    fine-tuning on little data is the same).
    """
    top = {id(b) for b in trainable_blocks(blocks, k)}
    for block in blocks:
        unfrozen = id(block) in top
        for param in block.parameters():
            param.requires_grad_(unfrozen)
        block.train(unfrozen)
        if unfrozen and not bn_train:
            for module in block.modules():
                if isinstance(module, _NORM_TYPES[:3]):
                    module.eval()


def param_groups(
    blocks: nn.ModuleList,
    head: nn.Module,
    k: int,
    head_lr: float,
    backbone_lr: float,
    layer_decay: float,
    weight_decay: float,
) -> list[dict]:
    """One group per trainable block: block j from the top gets backbone_lr · layer_decay**j.

    Biases and normalisation parameters get no weight decay (decaying them only hurts).
    """
    groups: list[dict] = []

    def add(module: nn.Module, lr: float, name: str) -> None:
        decay, no_decay = [], []
        for sub in module.modules():
            for param in sub.parameters(recurse=False):
                if not param.requires_grad:
                    continue
                is_norm = isinstance(sub, _NORM_TYPES)
                (no_decay if is_norm or param.ndim <= 1 else decay).append(param)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name})

    add(head, head_lr, "head")
    for j, block in enumerate(trainable_blocks(blocks, k)):
        add(block, backbone_lr * layer_decay**j, f"block-{j}")
    return groups
