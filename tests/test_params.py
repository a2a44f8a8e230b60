from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from pipeline.errors import PipelineError
from pipeline.params import load_params, params_hash

pytestmark = pytest.mark.fault  # bad input: part of the fault suite


def write(tmp_path: Path, mutate) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.backbone.name == "tf_efficientnet_lite0"
    assert len(params_hash(params)) == 16
    assert params.extract.batch_size == "auto"  # chosen per device at run time


def test_a_batch_size_can_be_a_number(tmp_path):
    assert load_params(write(tmp_path, lambda p: p["extract"].update(batch_size=128))).extract.batch_size == 128


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: p["finetune"].update(n_trails=3), "unknown key finetune.n_trails"),
        (lambda p: p["finetune"].pop("epochs"), "missing key finetune.epochs"),
        (lambda p: p["extract"].update(views="two"), "extract.views must be an integer"),
        (lambda p: p["finetune"].update(head_lr=[-0.1, 0.01]), "finetune.head_lr"),
        (lambda p: p["finetune"].update(backbone_lr_ratio=[0.1, 2.0]), "must not exceed 1.0"),
        (lambda p: p["finetune"].update(max_unfreeze=99), "finetune.max_unfreeze"),
        (lambda p: p["finetune"].update(bn_train="yes"), "finetune.bn_train must be true or false"),
        (lambda p: p["data"].update(test_fraction=0.5, val_fraction=0.45), "at least 10%"),
        (lambda p: p["extract"].update(batch_size="big"), "extract.batch_size must be a positive integer or auto"),
        (lambda p: p["evaluate"].update(batch_size=0), "evaluate.batch_size must be positive or auto"),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, needle):
    with pytest.raises(PipelineError) as info:
        load_params(write(tmp_path, mutate))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_exponent_floats_as_dvc_writes_them_are_numbers(tmp_path):
    """`dvc exp run -S finetune.weight_decay=[1.0e-05,0.001]` writes `1e-05` back, which PyYAML
    alone reads as a string."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"]["weight_decay"] = "WEIGHT_DECAY"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params).replace("WEIGHT_DECAY", "[1e-05, 0.001]"))
    assert yaml.safe_load(path.read_text())["finetune"]["weight_decay"][0] == "1e-05"  # PyYAML's reading
    assert load_params(path).finetune.weight_decay == (pytest.approx(1e-5), pytest.approx(1e-3))
