"""The models on top of the frozen backbone: the head, the top k blocks + head that trials train,
and the assembled classifiers (one model, or an ensemble) that run on pixels."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.backbones import Backbone


class Head(nn.Module):
    """Dropout + linear layer over pooled backbone features."""

    def __init__(self, num_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, classes)
        return self.fc(self.dropout(features))


class TopModel(nn.Module):
    """The top k blocks + pooling + head, fed with the cached input of the k-th block from the top.

    k = 0 is the head alone on pooled features.
    """

    def __init__(self, head: Head, blocks: list[nn.Module] | nn.ModuleList = ()):
        super().__init__()
        self.k = len(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @classmethod
    def top_of(cls, backbone: Backbone, head: Head, k: int) -> TopModel:
        return cls(head, backbone.top_blocks(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return self.head(x.float())  # (B, D) pooled features
        for block in self.blocks:
            x = block(x)
        return self.head(Backbone.pool(x))


class Classifier(nn.Module):
    """Backbone + head: the assembled model that evaluate, predict and serving run on pixels."""

    def __init__(self, backbone: Backbone, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → (B, classes)
        return self.head(self.backbone(x))


class EnsembleClassifier(nn.Module):
    """The frozen bottom of the backbone, run once, feeding M independently fine-tuned copies of
    the top k blocks + head; the output is the log of the members' mean probabilities, so a
    softmax of it is that mean. Averaging seeds removes most of what one seed's luck adds."""

    def __init__(self, backbone: Backbone, members: list[TopModel]):
        super().__init__()
        if not members or len({m.k for m in members}) != 1:
            raise ValueError("an ensemble needs members that all train the same top k blocks")
        self.backbone = backbone  # its top k blocks are the pretrained ones, unused here
        self.members = nn.ModuleList(members)
        self.k = members[0].k

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → (B, classes)
        cut = self.backbone.forward_blocks(x, 0, self.backbone.cut(self.k))
        if self.k == 0:
            cut = Backbone.pool(cut)  # (B, D) pooled features
        probabilities = torch.stack([torch.softmax(m(cut).float(), dim=1) for m in self.members])
        return probabilities.mean(dim=0).log()
