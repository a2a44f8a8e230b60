"""finetune.compile: a trial through torch.compile learns what the eager trial learns."""

import copy

import numpy as np
import torch
from torch import nn

from pipeline.devices import Runtime
from pipeline.model.engine import ArraySource, train
from pipeline.model.heads import Head, TopModel


def learnable(n: int, seed: int) -> ArraySource:
    """(n, 1 view, 8, 6, 6) activations whose class is which channel group is brightest."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 3, size=n)
    x = g.normal(size=(n, 1, 8, 6, 6)).astype(np.float32)
    for i, y in enumerate(labels):
        x[i, 0, 2 * y : 2 * y + 2] += 1.5
    return ArraySource(x, labels)


def one_trial(compile_model: bool):
    torch.manual_seed(0)
    # no conv bias before BatchNorm (as in the backbones): its gradient is rounding noise,
    # which Adam would blow up into lr-sized steps that differ between any two kernels
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    model = copy.deepcopy(TopModel(Head(8, 3, dropout=0.0), [block]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    best, history = train(model, optimizer, learnable(80, 1), learnable(40, 2), epochs=3, batch_size=16,
                          runtime=Runtime(torch.device("cpu"), None), seed=0, compile_model=compile_model)
    return best, history


def test_compiled_trial_matches_eager():
    from torch._dynamo.utils import counters

    counters.clear()
    eager_best, eager = one_trial(False)
    compiled_best, compiled = one_trial(True)
    assert counters["stats"]["unique_graphs"] > 0  # torch.compile really ran
    assert [r.val_accuracy for r in compiled] == [r.val_accuracy for r in eager]
    assert eager[-1].val_accuracy > 0.6  # it learned something to compare
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a.train_loss - b.train_loss) <= 1e-3 * abs(a.train_loss) + 1e-5
        assert abs(a.val_loss - b.val_loss) <= 1e-3 * abs(a.val_loss) + 1e-5
    for name, weight in eager_best.items():
        assert torch.allclose(compiled_best[name], weight, rtol=1e-3, atol=1e-5), name
