"""ONNX export: the file computes what the PyTorch model computes, on the pixels serving makes.

The model is tiny but real: EfficientNet-Lite0 (random-init weights, so nothing is downloaded) with
a head fitted by least squares to tell red, green and blue images apart, so a graph that reads
the channels in the wrong order changes its answers and the parity check has something to catch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import ROOT
from PIL import Image

from pipeline.__main__ import main
from pipeline.atomic import write_json
from pipeline.errors import PipelineError
from pipeline.model.backbones import build_backbone, normalize
from pipeline.model.checkpoints import read_config, save_checkpoint
from pipeline.model.heads import Classifier, EnsembleClassifier, Head, TopModel
from pipeline.serving import onnx_export
from pipeline.serving.classifier import ImageClassifier, to_png_bytes

BACKBONE = "tf_efficientnet_lite0"
SIZE = 64
CLASSES = ["red", "green", "blue"]


def colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, S, 3) uint8 noisy images, each mostly red, green or blue (the label), in turn."""
    labels = np.arange(n) % 3
    images = np.full((n, SIZE, SIZE, 3), 40.0)
    images[np.arange(n), :, :, labels] = 200.0
    images += np.random.default_rng(seed).normal(0, 25, images.shape)
    return images.clip(0, 255).astype(np.uint8), labels


def colour_model(weights: str = "none") -> Classifier:
    """The backbone with a head fitted (least squares on its pooled features) to the colours."""
    torch.manual_seed(0)
    backbone = build_backbone(BACKBONE, weights)
    pixels, labels = colour_images(12, seed=0)
    with torch.no_grad():
        features = backbone(normalize(torch.from_numpy(pixels), backbone.input_config))  # (12, D)
        centre = features.mean(0)
        targets = 8 * torch.nn.functional.one_hot(torch.from_numpy(labels), 3).float() - 4
        # gelsd (SVD): the default driver's answer to this rank-deficient system was all zeros on torch 2.6
        solution = torch.linalg.lstsq(features - centre, targets, driver="gelsd").solution  # (D, 3)
        head = Head(backbone.num_features, len(CLASSES), 0.0)
        head.fc.weight.copy_(solution.T)
        head.fc.bias.copy_(-(centre @ solution))
    return Classifier(backbone, head).eval()


def config_of(model: Classifier, weights: str, head_only: bool, **extra) -> dict:
    return {"head_only": head_only, "backbone": BACKBONE, "backbone_weights": weights,
            "num_features": model.backbone.num_features, "dropout": 0.0, "classes": CLASSES,
            "image_size": SIZE, "input_config": model.backbone.input_config, "k": 0, **extra}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A fine-tuned-style checkpoint: every weight in it."""
    model = colour_model()
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(directory, model.state_dict(), config_of(model, "none", head_only=False))
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, onnx_export.Parity]:
    target = tmp_path_factory.mktemp("export") / "onnx" / onnx_export.ONNX_FILE
    return target, onnx_export.export_checked(checkpoint, target, colour_images(30, seed=1)[0])


@pytest.fixture(scope="module")
def served(checkpoint) -> ImageClassifier:
    return ImageClassifier(checkpoint, onnx_export.FP32_CPU)


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_export_agrees_with_pytorch_and_stores_its_figures(exported, served):
    target, parity = exported
    pixels, labels = colour_images(30, seed=1)
    # the check means something: the model tells the colours apart, it is not one constant answer
    assert (served.probabilities(pixels).argmax(axis=1) == labels).all()
    assert parity.passed and parity.images == 30
    assert parity.top1_agreement == 1.0 and parity.max_abs_probability_diff < 1e-4
    stored = json.loads((target.parent / onnx_export.PARITY_FILE).read_text())
    assert stored["passed"] is True and stored["top1_agreement"] == 1.0
    assert stored["onnx_sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert parity.tags()["onnx.top1_agreement"] == "1.0"


def test_the_metadata_says_how_to_feed_the_graph(exported, checkpoint):
    loaded = session(exported[0])
    meta = loaded.get_modelmeta().custom_metadata_map
    config = read_config(checkpoint)
    assert int(meta["image_size"]) == SIZE and json.loads(meta["classes"]) == CLASSES
    assert (meta["layout"], meta["dtype"], meta["channel_order"]) == ("NHWC", "uint8", "RGB")
    assert json.loads(meta["mean"]) == config["input_config"]["mean"]
    assert json.loads(meta["std"]) == config["input_config"]["std"]
    assert float(meta["temperature"]) == 1.0 and "fit" in meta["preprocessing"]
    (graph_input,) = loaded.get_inputs()
    assert (graph_input.name, graph_input.type, graph_input.shape[1:]) == ("images", "tensor(uint8)", [SIZE, SIZE, 3])


def test_any_batch_size_runs(exported):
    loaded = session(exported[0])
    pixels = colour_images(5, seed=2)[0]
    (five,) = loaded.run(["probabilities"], {"images": pixels})
    (one,) = loaded.run(["probabilities"], {"images": pixels[:1]})
    assert five.shape == (5, 3) and one.shape == (1, 3) and five.dtype == np.float32
    np.testing.assert_allclose(one[0], five[0], atol=1e-6)
    np.testing.assert_allclose(five.sum(axis=1), 1.0, atol=1e-5)


def readme_snippet() -> str:
    """The README's onnxruntime example: the indented block after its 'Without this package' heading."""
    lines = (ROOT / "README.md").read_text().split("### Without this package: ONNX", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    import json"))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block)


def non_square_png(mode: str, height: int, width: int) -> bytes:
    """Red | green | blue thirds across the long side: the centre crop keeps green, a squash would not."""
    image = np.zeros((height, width, 3), np.uint8)
    long = max(height, width)
    for third, colour in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        band = slice(third * long // 3, (third + 1) * long // 3)
        image[(band, slice(None)) if height > width else (slice(None), band)] = colour
    if mode == "RGBA":  # a transparent edge: composited on white on both sides
        alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
        image = np.dstack([image, alpha])
    return to_png_bytes(image)


@pytest.mark.parametrize(("mode", "height", "width"), [("RGB", 40, 100), ("RGBA", 90, 30)])
def test_the_readme_snippet_on_a_non_square_png_gives_the_served_probabilities(
        exported, served, tmp_path, monkeypatch, capsys, mode, height, width):
    png = non_square_png(mode, height, width)
    shutil.copy(exported[0], tmp_path / "model.onnx")
    (tmp_path / "image.png").write_bytes(png)
    monkeypatch.chdir(tmp_path)
    snippet: dict = {}
    exec(readme_snippet(), snippet)  # only onnxruntime, numpy and Pillow
    assert Image.open(tmp_path / "image.png").mode == mode
    np.testing.assert_array_equal(snippet["pixels"], served.pixels_from([png]))  # the same preprocessing
    expected = served.predict([png])
    np.testing.assert_allclose(snippet["probabilities"], expected.probabilities[0], atol=1e-4)
    assert capsys.readouterr().out.split()[0] == expected.label[0]


def ensemble_of(model: Classifier) -> EnsembleClassifier:
    """Two members training the top block + head, each nudged as its own seed would."""
    torch.manual_seed(1)
    members = []
    for _ in range(2):
        top = copy.deepcopy(TopModel.top_of(model.backbone, model.head, 1))
        with torch.no_grad():
            for parameter in top.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        members.append(top.eval())
    return EnsembleClassifier(copy.deepcopy(model.backbone), members).eval()


@pytest.mark.parametrize("kind", ["head_only", "ensemble"])
def test_head_only_and_ensemble_checkpoints_export_with_parity(kind, tmp_path):
    if kind == "head_only":  # only the head is stored; load_classifier rebuilds the backbone from its source
        model = colour_model("pretrained")  # reproducible, unlike a random init rebuilt on each load
        state, config = model.head.state_dict(), config_of(model, "pretrained", head_only=True)
    else:
        model = colour_model()
        state = ensemble_of(model).state_dict()
        config = config_of(model, "none", head_only=False, k=1, members=[{"seed": 1}, {"seed": 2}])
    save_checkpoint(tmp_path / "checkpoint", state, config)
    pixels = colour_images(9, seed=3)[0]
    parity = onnx_export.export_checked(tmp_path / "checkpoint", tmp_path / "model.onnx", pixels)
    assert parity.top1_agreement == 1.0 and parity.max_abs_probability_diff < 1e-4
    predicted = ImageClassifier(tmp_path / "checkpoint", onnx_export.FP32_CPU).probabilities(pixels).argmax(axis=1)
    assert set(predicted) == {0, 1, 2}  # the check means something: the model tells the colours apart


def test_an_export_that_disagrees_is_refused_and_writes_no_model(checkpoint, tmp_path, monkeypatch):
    """A graph that reads BGR (the classic export bug) must not pass for the model."""
    traced = onnx_export.ServingGraph.forward
    monkeypatch.setattr(onnx_export.ServingGraph, "forward", lambda graph, images: traced(graph, images.flip(-1)))
    target = tmp_path / "model.onnx"
    with pytest.raises(PipelineError, match=r"ONNX export refused: .*top-1 agreement 33\.33%") as refused:
        onnx_export.export_checked(checkpoint, target, colour_images(30, seed=1)[0])
    assert "\n" not in str(refused.value) and str(target) in str(refused.value)
    assert not target.exists()
    stored = json.loads((tmp_path / onnx_export.PARITY_FILE).read_text())
    assert stored["passed"] is False and stored["top1_agreement"] < 0.5


def test_the_temperature_of_model_json_is_in_the_graph(checkpoint, exported, tmp_path):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(checkpoint, calibrated)
    write_json(calibrated / "model.json", {**read_config(checkpoint), "temperature": 2.0})
    onnx_export.export(calibrated, tmp_path / "model.onnx")
    pixels = colour_images(6, seed=4)[0]
    at_one = onnx_export.onnx_probabilities(exported[0], pixels)
    at_two = onnx_export.onnx_probabilities(tmp_path / "model.onnx", pixels)
    expected = np.sqrt(at_one) / np.sqrt(at_one).sum(axis=1, keepdims=True)  # softmax(z / 2) from softmax(z)
    np.testing.assert_allclose(at_two, expected, atol=1e-5)
    assert session(tmp_path / "model.onnx").get_modelmeta().custom_metadata_map["temperature"] == "2.0"


def test_the_cli_exports_a_checkpoint_checked_on_a_folder_of_images(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, pixels in enumerate(colour_images(3, seed=5)[0]):
        (folder / f"{i}.png").write_bytes(to_png_bytes(pixels))
    (folder / "broken.png").write_bytes(b"not an image")  # skipped, as predict skips it
    out = tmp_path / "export" / "model.onnx"
    assert main(["export", "--model", str(checkpoint), "--out", str(out), "--images", str(folder)]) == 0
    assert json.loads((out.parent / onnx_export.PARITY_FILE).read_text())["images"] == 3
    assert "top-1 agreement 100.00%" in capsys.readouterr().out


def test_the_cli_says_what_to_give_when_it_has_no_model_or_images(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not a project: no selection.json, no prepared test split
    assert main(["export"]) == 2
    assert main(["export", "--model", str(checkpoint)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "selection.json is missing" in errors[0] and "--images" in errors[1]
    assert not (tmp_path / "models").exists()
