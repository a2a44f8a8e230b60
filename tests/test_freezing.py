import pytest
from torch import nn

from pipeline.model.freezing import freeze_all_but_top, param_groups


def blocks() -> nn.ModuleList:
    return nn.ModuleList(
        [nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)) for _ in range(4)]
    )


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_only_top_k_blocks_train(k):
    b = blocks()
    freeze_all_but_top(b, k, bn_train=False)
    for i, block in enumerate(b):
        unfrozen = i >= 4 - k
        assert all(p.requires_grad == unfrozen for p in block.parameters())
        assert block[0].training == unfrozen
        assert not block[1].training  # BN statistics frozen unless bn_train


def test_bn_train_lets_unfrozen_bn_update():
    b = blocks()
    freeze_all_but_top(b, 1, bn_train=True)
    assert b[3][1].training and not b[2][1].training


def test_layer_decay_and_no_decay_groups():
    b, head = blocks(), nn.Linear(3, 2)
    freeze_all_but_top(b, 2, bn_train=False)
    groups = param_groups(b, head, 2, head_lr=1.0, backbone_lr=0.5, layer_decay=0.5,
                          weight_decay=0.1)
    lrs = {(g["name"], g["weight_decay"]): g["lr"] for g in groups}
    assert lrs[("head", 0.1)] == 1.0
    assert lrs[("block-0", 0.1)] == 0.5  # top block
    assert lrs[("block-1", 0.1)] == 0.25  # one deeper: decayed once
    assert lrs[("block-0", 0.0)] == 0.5  # biases/BN without weight decay
    n_trainable = sum(p.numel() for p in [*b[2].parameters(), *b[3].parameters(),
                                           *head.parameters()])
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable


def test_k_out_of_range():
    with pytest.raises(ValueError):
        freeze_all_but_top(blocks(), 5, bn_train=False)
