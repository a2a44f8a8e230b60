"""Correctness of what training and serving share: fp16 loss scaling, the image preprocessing
serving applies to arrays, and the decompression-bomb cap serving and predict decode under."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.data.images import decode_image
from pipeline.devices import Runtime
from pipeline.errors import PipelineError
from pipeline.model.engine import ArraySource, train
from pipeline.serving.classifier import to_png_bytes

CPU = torch.device("cpu")
BACKBONE = "tf_efficientnet_lite0"
SIZE = 32


# --- 1. fp16 training scales the loss --------------------------------------------------------


class Tiny(nn.Module):
    """Multiplies by a constant: the gradient behind it is the incoming one times `factor`."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class RecordingSGD(torch.optim.SGD):
    """lr 0 (weights stay put); records the gradients each step() is given."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def gradients_the_optimizer_sees(amp_dtype) -> list[torch.Tensor]:
    """One step on a linear layer whose output gradient (~0.03 x 1e-7 = 3e-9) is below fp16's
    smallest subnormal (6e-8): in fp16 it flushes to zero unless the loss is scaled first."""
    torch.manual_seed(0)
    n, dim = 16, 6
    g = np.random.default_rng(0)
    labels = (np.arange(n) % 4 == 0).astype(int)  # unbalanced, or the bias gradient sums to ~0
    source = ArraySource(g.normal(size=(n, 1, dim)).astype(np.float32), labels)
    model = nn.Sequential(nn.Linear(dim, 2), Tiny(1e-7))
    optimizer = RecordingSGD(model.parameters())
    train(model, optimizer, source, source, epochs=1, batch_size=n,
          runtime=Runtime(CPU, amp_dtype), seed=0)
    (grads,) = optimizer.grads
    return grads


def test_fp16_training_steps_with_the_gradients_fp32_computes():
    reference = gradients_the_optimizer_sees(None)
    fp16 = gradients_the_optimizer_sees(torch.float16)
    assert all(r.abs().max() > 0 for r in reference)  # the fp32 step does have gradients
    for r, h in zip(reference, fp16, strict=True):
        assert h.abs().max() > 0, "fp16 gradients underflowed to zero (no loss scaling)"
        torch.testing.assert_close(h, r, rtol=2e-2, atol=r.abs().max().item() * 2e-2)


@pytest.mark.parametrize(("gpu", "capability", "expected"), [
    ("V100", (7, 0), torch.float16), ("T4", (7, 5), torch.float16),  # bf16 only emulated there
    ("A100", (8, 0), torch.bfloat16), ("H100/H200", (9, 0), torch.bfloat16)])
def test_auto_precision_on_a_gpu_is_bf16_only_where_the_gpu_computes_it(monkeypatch, gpu, capability, expected):
    from pipeline.devices import select_runtime

    monkeypatch.delenv("PIPELINE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # as torch says on a T4
    for training in (False, True):
        runtime = select_runtime("auto", training=training)
        assert runtime.device.type == "cuda" and runtime.amp_dtype == expected, gpu


def test_free_gpu_memory_counts_what_the_allocator_caches_but_no_tensor_uses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))  # the driver's free, total
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700)  # PyTorch's cache holds 700 ...
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)  # ... of which tensors use 200
    assert Runtime(torch.device("cuda"), torch.bfloat16).free_bytes() == 1500


def test_only_fp16_gets_a_gradient_scaler():
    from pipeline.model.engine import grad_scaler

    assert grad_scaler(Runtime(CPU, torch.float16)).is_enabled()
    assert not grad_scaler(Runtime(CPU, torch.bfloat16)).is_enabled()
    assert not grad_scaler(Runtime(CPU, None)).is_enabled()


# --- serving checkpoints ---------------------------------------------------------------------


def head_only_checkpoint(directory: Path, **extra) -> Path:
    from pipeline.model.backbones import build_backbone
    from pipeline.model.checkpoints import save_checkpoint
    from pipeline.model.heads import Head

    backbone = build_backbone(BACKBONE, "none")
    torch.manual_seed(0)
    head = Head(backbone.num_features, 2, 0.0)
    config = {"head_only": True, "backbone": BACKBONE, "backbone_weights": "none",
              "num_features": backbone.num_features, "dropout": 0.0, "classes": ["a", "b"],
              "image_size": SIZE, "input_config": backbone.input_config, "k": 0, **extra}
    save_checkpoint(directory, head.state_dict(), config)
    return directory


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from pipeline.serving.classifier import ImageClassifier

    return ImageClassifier(head_only_checkpoint(tmp_path_factory.mktemp("ckpt")))


# --- 2. serving preprocesses arrays as training preprocessed files --------------------------


def banded(height: int, width: int) -> np.ndarray:
    """Red | green | blue vertical thirds: a squash keeps all three, a centre crop does not."""
    image = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    image[:, :third] = (220, 30, 30)
    image[:, third : 2 * third] = (30, 220, 30)
    image[:, 2 * third :] = (30, 30, 220)
    return image


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (50, 50)])
def test_serving_an_array_gives_the_pixels_training_decoded_from_its_png(classifier, shape):
    image = banded(*shape) if shape[1] >= shape[0] else banded(shape[1], shape[0]).transpose(1, 0, 2)
    trained_on = decode_image(to_png_bytes(image), SIZE, 10**8).pixels
    np.testing.assert_array_equal(classifier.pixels_from(image)[0], trained_on)
    batch = classifier.pixels_from(np.stack([image, image]))
    np.testing.assert_array_equal(batch, np.stack([trained_on, trained_on]))


def test_serving_an_rgba_array_composites_it_on_white_as_training_did(classifier):
    image = np.dstack([banded(40, 90), np.tile(np.linspace(0, 255, 90).astype(np.uint8), (40, 1))])
    trained_on = decode_image(to_png_bytes(image), SIZE, 10**8).pixels
    np.testing.assert_array_equal(classifier.pixels_from(image)[0], trained_on)


def test_serving_refuses_an_array_that_is_not_an_image(classifier):
    with pytest.raises(PipelineError, match=r"\(H, W, 3\) or \(B, H, W, 3\)"):
        classifier.pixels_from(np.zeros((32, 32), np.uint8))


# --- 3. serving and predict keep the training decompression-bomb cap --------------------------


def test_a_checkpoint_without_a_cap_serves_under_the_shipped_default(classifier):
    from pipeline.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from pipeline.params import load_params

    shipped = load_params(Path(__file__).parents[1] / "params.yaml").data.max_image_pixels
    assert shipped == DEFAULT_MAX_IMAGE_PIXELS
    assert classifier.max_pixels == shipped


@pytest.fixture(scope="module")
def capped(tmp_path_factory) -> Path:
    return head_only_checkpoint(tmp_path_factory.mktemp("capped"), max_image_pixels=5000)


def test_serving_refuses_an_image_over_the_checkpoint_cap(capped):
    from pipeline.serving.classifier import ImageClassifier

    classifier = ImageClassifier(capped)
    small, big = (to_png_bytes(np.full((s, s, 3), 90, np.uint8)) for s in (50, 100))
    assert len(classifier.predict([small])) == 1  # 2500 px: under the cap
    with pytest.raises(PipelineError, match=r"100x100 exceeds data.max_image_pixels=5000"):
        classifier.predict([big])
    with pytest.raises(PipelineError, match="max_image_pixels=5000"):
        classifier.predict(pd.DataFrame({"image": [small, big]}))
    assert classifier.max_pixels == 5000


def test_predict_writes_an_error_row_for_an_image_over_the_checkpoint_cap(capped, tmp_path):
    from pipeline.serving.predict import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "big.png").write_bytes(to_png_bytes(np.full((100, 100, 3), 90, np.uint8)))
    (images / "small.png").write_bytes(to_png_bytes(np.full((50, 50, 3), 90, np.uint8)))
    output = tmp_path / "predictions.csv"
    main(str(capped), [images], output)
    rows = pd.read_csv(output, keep_default_na=False).set_index("path")
    big, small = rows.loc[str(images / "big.png")], rows.loc[str(images / "small.png")]
    assert "max_image_pixels=5000" in big.error and big.label == ""
    assert small.error == "" and small.label in ("a", "b")
