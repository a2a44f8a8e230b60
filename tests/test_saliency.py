"""Grad-CAM: it finds a planted signal in a model trained here, and runs on the real models."""

import copy
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.model.backbones import Backbone, build_backbone, normalize
from pipeline.model.heads import Classifier, EnsembleClassifier, Head, TopModel
from pipeline.reporting.figures import save
from pipeline.reporting.saliency import grad_cam, saliency_grid, target_layers

SIZE, PATCH = 32, 8
TOY_CONFIG = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
STRIPES = ("horizontal", "vertical")


def striped_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noise with one 8×8 striped patch anywhere: horizontal stripes are class 0, vertical
    class 1. Only the patch says which, and it moves: (pixels (N, 32, 32, 3) uint8, labels, corners)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128, 25, size=(n, SIZE, SIZE)), 0, 255)
    labels = rng.integers(0, 2, size=n)
    corners = rng.integers(0, SIZE - PATCH + 1, size=(n, 2))
    stripes = np.where(np.arange(PATCH) % 2 == 0, 216.0, 40.0)
    for image, label, (row, col) in zip(pixels, labels, corners, strict=True):
        image[row:row + PATCH, col:col + PATCH] = stripes[:, None] if label == 0 else stripes[None, :]
    return np.repeat(pixels[..., None], 3, axis=3).astype(np.uint8), labels, corners


def toy_classifier() -> Classifier:
    """A three-block CNN built like ours: a Backbone whose last block's output (16×16) is pooled."""
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())]
    return Classifier(Backbone("toy", blocks, 16, TOY_CONFIG), Head(16, 2, dropout=0.0))


@pytest.fixture(scope="module")
def trained_toy():
    torch.manual_seed(0)
    model = toy_classifier()
    pixels, labels, _ = striped_images(384, seed=0)
    x, y = normalize(torch.from_numpy(pixels), TOY_CONFIG), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):  # ~3 s on 2 busy cores; 100% test accuracy for every seed tried
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def patch_mask(corner) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[corner[0]:corner[0] + PATCH, corner[1]:corner[1] + PATCH] = True
    return mask


def test_the_map_peaks_on_the_planted_patch(trained_toy):
    pixels, labels, corners = striped_images(64, seed=1)
    x = normalize(torch.from_numpy(pixels), TOY_CONFIG)
    with torch.no_grad():
        assert (trained_toy(x).argmax(1).numpy() == labels).mean() > 0.9  # it learned the task
    maps = grad_cam(trained_toy, x, target_classes=labels)
    assert maps.shape == (64, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    inside = np.array([m[patch_mask(c)].mean() for m, c in zip(maps, corners, strict=True)])
    outside = np.array([m[~patch_mask(c)].mean() for m, c in zip(maps, corners, strict=True)])
    assert (inside > outside + 0.25).mean() >= 0.8, (inside - outside).round(2)
    # and the hottest pixel is on the patch (its 2-pixel rim allowed: the map is 16×16, upsampled)
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    near = [c[0] - 2 <= r < c[0] + PATCH + 2 and c[1] - 2 <= q < c[1] + PATCH + 2
            for (r, q), c in zip(peaks, corners, strict=True)]
    assert np.mean(near) >= 0.8


def test_any_module_with_a_named_layer_gives_the_same_map(trained_toy):
    blocks = trained_toy.backbone.blocks
    plain = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), trained_toy.head.fc).eval()
    pixels, _, _ = striped_images(4, seed=2)
    x = normalize(torch.from_numpy(pixels), TOY_CONFIG)
    np.testing.assert_allclose(grad_cam(plain, x, layers=[plain[2]]), grad_cam(trained_toy, x), atol=1e-5)
    with pytest.raises(TypeError, match="pass the layers"):
        grad_cam(plain, x)


def test_the_model_is_left_as_it_was(trained_toy):
    pixels, _, _ = striped_images(2, seed=3)
    x = normalize(torch.from_numpy(pixels), TOY_CONFIG)
    trained_toy.train()
    try:
        with torch.inference_mode():  # as scoring calls it
            grad_cam(trained_toy, x)
        assert trained_toy.training
        assert all(p.grad is None for p in trained_toy.parameters())
        assert not trained_toy.backbone.blocks[-1]._forward_hooks  # the library's hooks are gone
    finally:
        trained_toy.eval()


def test_the_grid_is_a_png(trained_toy, tmp_path):
    pixels, labels, _ = striped_images(7, seed=4)
    figure = saliency_grid(trained_toy, pixels, labels, None, list(STRIPES), TOY_CONFIG)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == 7 and all(" → " in t and t.endswith(")") for t in titles)
    path = save(figure, tmp_path / "saliency.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def real_input(n: int = 4, size: int = 128, seed: int = 0):
    backbone = build_backbone("tf_efficientnet_lite0", "none")
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return backbone, pixels, normalize(torch.from_numpy(pixels), backbone.input_config)


def test_it_runs_on_a_real_classifier_quickly(tmp_path):
    backbone, pixels, x = real_input()
    model = Classifier(backbone, Head(backbone.num_features, 3)).eval()
    assert target_layers(model) == [backbone.blocks[-1]]
    grad_cam(model, x[:1])  # first call pays one-off costs (imports, allocator)
    start = time.perf_counter()
    maps = grad_cam(model, x)
    elapsed = time.perf_counter() - start
    assert maps.shape == (4, 128, 128) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert elapsed < 10, f"{elapsed:.2f} s for 4 images"  # ~0.3 s measured; loose for shared cores
    path = save(saliency_grid(model, pixels[:2], [0, 1], [2, 1], ["a", "b", "c"], backbone.input_config),
                tmp_path / "real.png")
    assert path.stat().st_size > 0


@pytest.mark.parametrize("k", [0, 1])
def test_it_runs_on_an_ensemble(k):
    backbone, _, x = real_input(n=2)
    top = TopModel.top_of(backbone, Head(backbone.num_features, 3), k)
    model = EnsembleClassifier(backbone, [copy.deepcopy(top) for _ in range(2)]).eval()
    layers = target_layers(model)
    assert layers == ([backbone.blocks[-1]] if k == 0 else [m.blocks[-1] for m in model.members])
    maps = grad_cam(model, x, target_classes=[0, 2])
    assert maps.shape == (2, 128, 128) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
