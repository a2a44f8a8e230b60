"""The stability command's own parts: the noise it adds and the verdict it prints."""

import numpy as np

from pipeline.tools.stability import BF16_RELATIVE_NOISE, Outcome, perturb_features, verdict


def test_perturbed_features_carry_bf16_sized_relative_noise_and_nothing_else(tmp_path):
    source, target = tmp_path / "features", tmp_path / "noisy"
    source.mkdir()
    rng = np.random.default_rng(0)
    activations = rng.normal(size=(50, 3, 8, 4, 4)).astype(np.float16)
    np.save(source / "train_cut1.npy", activations)
    np.save(source / "train_labels.npy", np.arange(50))
    (source / "meta.json").write_text("{}")
    perturb_features(source, target, seed=1)

    noisy = np.load(target / "train_cut1.npy")
    assert noisy.dtype == np.float16 and noisy.shape == activations.shape
    relative = np.abs(noisy.astype(np.float32) / activations.astype(np.float32) - 1)[activations != 0]
    assert relative.max() <= BF16_RELATIVE_NOISE + 2**-10  # the noise plus float16's own rounding
    assert relative.mean() > BF16_RELATIVE_NOISE / 4  # really perturbed, not just re-rounded
    np.testing.assert_array_equal(np.load(target / "train_labels.npy"), np.arange(50))
    assert (target / "meta.json").read_text() == "{}"


def test_the_verdict_checks_each_target_from_the_runs():
    def run(shipped, head=0.70):
        return Outcome("run", 42, head, "finetuned", shipped, 3, 1.0)

    good = verdict([run(0.80), run(0.81), run(0.83)], twin=run(0.815))
    assert good.count("[x]") == 4
    bad = verdict([run(0.69), run(0.75), run(0.80)], twin=run(0.66))
    assert bad.count("[ ]") == 4  # worse than head-only once, gain < 8, spread 11, twin 3 off
