"""Grad-CAM saliency (Selvaraju et al., 2017) for the assembled models, and the report's grid of
images with the map of their predicted class overlaid: where in the picture the model looked.

The maps come from the maintained `grad-cam` library (pytorch_grad_cam, on opencv-python-headless,
so no libGL); this module says where our models' last feature map is and feeds the model as
scoring does (backbones.normalize, fp32); the model keeps its train/eval mode and is left
with no gradients on its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.model.backbones import normalize
from pipeline.model.heads import Classifier, EnsembleClassifier
from pipeline.reporting.figures import _pyplot

MAX_SALIENCY_IMAGES = 12
OVERLAY_ALPHA = 0.45


def target_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output is the last convolutional feature map, the one pooling averages.

    Every backbone's block list ends at that map (backbones.py), so for a Classifier it is the
    output of backbone.blocks[-1]. An EnsembleClassifier's members each fine-tuned their own
    copy of the top k blocks: each member's last block is hooked, and the library averages
    the members' maps, each scaled to [0, 1] first, so every member counts the same. With
    k = 0 the members share the backbone's map and their gradients add up on it.
    """
    if isinstance(model, Classifier):
        return [model.backbone.blocks[-1]]
    if isinstance(model, EnsembleClassifier):
        if model.k == 0:
            return [model.backbone.blocks[-1]]
        return [member.blocks[-1] for member in model.members]
    raise TypeError(f"no default Grad-CAM layer for {type(model).__name__}: pass the layers")


def _maps_and_outputs(model: nn.Module, x: torch.Tensor, target_classes: Sequence[int] | None,
                      layers: list[nn.Module] | None) -> tuple[np.ndarray, torch.Tensor]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    cam = GradCAM(model=model, target_layers=layers or target_layers(model))  # sets eval mode
    try:
        # callers score under inference_mode; Grad-CAM needs a graph
        with torch.inference_mode(False), torch.enable_grad():
            # the library reads each target layer's gradient from a hook on its output, which
            # exists only when something below it needs a gradient: a frozen backbone does not
            x = x.detach().float().clone().requires_grad_(True)
            targets = None if target_classes is None else [ClassifierOutputTarget(int(c)) for c in target_classes]
            maps = cam(input_tensor=x, targets=targets)
        return maps, cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()  # not `with`: the library's __exit__ swallows IndexError
        model.zero_grad(set_to_none=True)  # its backward filled every parameter's .grad
        model.train(was_training)


def grad_cam(model: nn.Module, x: torch.Tensor, target_classes: Sequence[int] | None = None,
             layers: list[nn.Module] | None = None) -> np.ndarray:
    """(B, 3, H, W) model input → (B, H, W) float32 maps in [0, 1], upsampled to the input size.

    target_classes: the class index to explain per image (default: the predicted one). The score explained
    is the model's output for it: a Classifier's logit, an ensemble's log mean probability.
    layers: where the feature map is; default target_layers(model), any module for other models.
    """
    return _maps_and_outputs(model, x, target_classes, layers)[0]


def saliency_grid(model: nn.Module, pixels: np.ndarray, labels: Sequence[int], predicted: Sequence[int] | None,
                  classes: list[str], input_config: dict, layers: list[nn.Module] | None = None):
    """Up to MAX_SALIENCY_IMAGES of (N, S, S, 3) uint8 images, each with the Grad-CAM map of its
    predicted class overlaid, titled 'given → predicted (p)'. predicted=None: the model's argmax.
    Returns the figure; figures.save writes it."""
    n = min(len(pixels), MAX_SALIENCY_IMAGES)
    images = np.ascontiguousarray(pixels[:n])
    maps, outputs = _maps_and_outputs(model, normalize(torch.from_numpy(images), input_config),
                                      None if predicted is None else predicted[:n], layers)
    probabilities = torch.softmax(outputs.float(), dim=1).cpu().numpy()
    shown = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted[:n])
    return _draw_grid(images, maps, [
        f"{classes[int(given)]} → {classes[int(guess)]} ({probabilities[i, int(guess)]:.2f})"
        for i, (given, guess) in enumerate(zip(labels[:n], shown, strict=True))
    ])


def _draw_grid(images: np.ndarray, maps: np.ndarray, titles: list[str]):
    plt = _pyplot()
    n = len(images)
    columns = min(6, max(n, 1))
    rows = max(1, -(-n // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, title in zip(axes.flat, images, maps, titles, strict=False):
        ax.imshow(image)
        ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
    if n == 0:
        axes[0][0].text(0.5, 0.5, "no images", ha="center", va="center")
    figure.tight_layout()
    return figure
