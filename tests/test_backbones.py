import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.devices import Runtime
from pipeline.errors import PipelineError
from pipeline.model.backbones import (
    _SPLITTERS,
    REGISTRY,
    Backbone,
    _timm_model,
    build_backbone,
    normalize,
    spec_for,
)
from pipeline.model.bn_folding import folded_copy
from pipeline.model.features import forward_with_cuts
from pipeline.model.heads import Classifier, Head, TopModel

OFFLINE = [n for n, s in REGISTRY.items() if s.offline_package is None or "lite0" in n]


@pytest.mark.parametrize("name", OFFLINE)
def test_blocks_reproduce_the_timm_features(name):
    """Cutting a model into blocks must not change what it computes."""
    model = _timm_model(name, "none").eval()
    ours = Backbone(name, _SPLITTERS[spec_for(name).family](model), model.num_features, {})
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model.forward_features(x).mean(dim=(2, 3))
        assert torch.allclose(ours(x), expected, atol=1e-5)
    assert ours.num_features == expected.shape[1]
    assert len(ours.blocks) >= 5


def test_unknown_backbone_lists_choices():
    with pytest.raises(PipelineError, match="resnet50"):
        build_backbone("resnet9000", "none")


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "nope.safetensors"))


def test_offline_weights_are_really_pretrained():
    """ImageNet weights: scikit-image's cat is a cat class, its coffee an espresso (967)."""
    from skimage import data

    model = _timm_model("tf_efficientnet_lite0", "pretrained").eval()
    config = build_backbone("tf_efficientnet_lite0", "none").input_config
    for image, expected in ((data.chelsea(), {281, 282, 285}), (data.coffee(), {967})):
        pixels = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC)).copy()
        with torch.no_grad():
            logits = model(normalize(torch.from_numpy(pixels)[None], config))
        assert int(logits.argmax()) in expected
    # and random init is not: the same cat is not recognised
    random_model = _timm_model("tf_efficientnet_lite0", "none").eval()
    pixels = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224))).copy()
    with torch.no_grad():
        assert int(random_model(normalize(torch.from_numpy(pixels)[None], config)).argmax()) not in {
            281, 282, 285}


def pretrained_like(backbone: Backbone, seed: int = 1) -> Backbone:
    """Random init leaves every BatchNorm an identity, under which a wrong fold would hide:
    give them the non-trivial statistics and affine weights a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.3, generator=g)
    return backbone


def batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize("name", OFFLINE)
def test_folded_batchnorm_computes_the_same_features(name):
    backbone = pretrained_like(build_backbone(name, "none"))
    before = batchnorms(backbone)
    folded = folded_copy(backbone)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = backbone(x), folded(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    if batchnorms(backbone):  # every family but plain VGG has BatchNorms after convs to fold
        assert batchnorms(folded) < batchnorms(backbone)
    assert batchnorms(backbone) == before  # a copy: trials train the unfolded blocks


class NormThenConv(nn.Module):
    """Children listed conv, bn — but the data flows bn → conv: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_fold_that_would_change_the_output_is_not_kept():
    backbone = pretrained_like(Backbone("toy", [NormThenConv(), nn.Sequential(nn.Conv2d(3, 4, 1),
                                                                             nn.BatchNorm2d(4))], 4, {}))
    folded = folded_copy(backbone.eval())
    assert isinstance(folded.blocks[0].bn, nn.BatchNorm2d)  # kept: its fold fails the check
    assert batchnorms(folded.blocks[1]) == 0  # folded: a Sequential is data flow
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), backbone(x), atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_cached_activations_reproduce_the_full_forward(k):
    """A trial that trains the top k blocks on what extract cached (BatchNorm folded, float16)
    computes the same function as the whole unfolded network."""
    torch.manual_seed(0)
    backbone = pretrained_like(build_backbone("tf_efficientnet_lite0", "none"))
    head = Head(backbone.num_features, 3, dropout=0.0).eval()
    x = torch.randn(3, 3, 64, 64)
    fp32 = Runtime(torch.device("cpu"), None)
    pooled, cuts = forward_with_cuts(folded_copy(backbone), x, 4, fp32)
    cached_input = pooled if k == 0 else cuts[k].half().float()  # stored as float16
    top = TopModel.top_of(backbone, head, k).eval()
    with torch.no_grad():
        full = Classifier(backbone, head)(x)
        via_cache = top(cached_input)
    assert torch.allclose(via_cache, full, atol=2e-2, rtol=1e-2)


def test_extraction_writes_the_same_cache_in_many_device_chunks_as_in_one(tmp_path, monkeypatch):
    """extract_split stages images in chunks that fit the device and writes one batch behind it:
    chunk boundaries, the last partial batch and every view land where one chunk puts them."""
    from pipeline.model import features

    torch.manual_seed(0)
    backbone = folded_copy(build_backbone("tf_efficientnet_lite0", "none"))
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    rows = np.array([9, 0, 3, 5, 1, 7, 2, 8, 6, 4])
    fp32 = Runtime(torch.device("cpu"), None)

    class NoBar:
        def update(self, n):
            pass

    def extract(folder):
        folder.mkdir()
        features.extract_split(backbone, images, rows, 2, 2, 4, fp32, 7, folder, "train", NoBar())
        return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}

    one = extract(tmp_path / "one")
    monkeypatch.setattr(features, "RESIDENT_SHARE", 1e-12)  # room for one batch: a chunk per batch
    many = extract(tmp_path / "many")
    assert sorted(one) == ["train_cut1.npy", "train_cut2.npy", "train_pooled.npy"]
    assert one["train_pooled.npy"].shape[:2] == (10, 2)
    for name in one:
        assert np.array_equal(one[name], many[name]), name
    assert not np.array_equal(one["train_pooled.npy"][:, 0], one["train_pooled.npy"][:, 1])  # view 1 augmented
