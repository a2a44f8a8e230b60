"""The classification head, shared by train_head (on cached features) and finetune (on top of blocks)."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Dropout + linear layer over pooled backbone features."""

    def __init__(self, num_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, classes)
        return self.fc(self.dropout(features))
