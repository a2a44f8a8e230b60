import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import check_class_sizes, scan_source, split_of, validate_files
from pipeline.data.images import UnusableImage, content_hash, decode_image
from pipeline.errors import PipelineError

pytestmark = pytest.mark.fault  # bad input: part of the fault suite


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_split_is_stable_when_images_are_added():
    rng = np.random.default_rng(0)
    digests = [content_hash(rng.bytes(64)) for _ in range(400)]
    before = {d: split_of(d, 0.15, 0.2) for d in digests[:200]}
    after = {d: split_of(d, 0.15, 0.2) for d in digests}  # 200 more images arrive
    assert all(after[d] == s for d, s in before.items())
    fractions = {s: list(after.values()).count(s) / 400 for s in ("train", "val", "test")}
    assert abs(fractions["test"] - 0.2) < 0.07 and abs(fractions["val"] - 0.15) < 0.07


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    decoded = decode_image(png_bytes(ramp), 64, 10**8)
    assert decoded.pixels.shape == (64, 64, 3)
    assert decoded.pixels.min() < 10 and decoded.pixels.max() > 245
    assert 100 < decoded.pixels.mean() < 155  # a ramp, not a white sheet
    assert any("8-bit" in c for c in decoded.conversions)


def test_rgba_composited_on_white():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    decoded = decode_image(png_bytes(rgba), 32, 10**8)
    assert (decoded.pixels == 255).all()


def test_exif_orientation_applied():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded = decode_image(buffer.getvalue(), 16, 10**8)
    assert decoded.width == 20 and decoded.height == 40  # portrait after orientation
    top, bottom = decoded.pixels[:4].mean(), decoded.pixels[-4:].mean()
    assert top > 200 and bottom < 50  # left edge became the top


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is text, not a jpeg", "not a readable image"),
    ],
)
def test_unusable_files_have_reasons(data, reason):
    with pytest.raises(UnusableImage, match=reason):
        decode_image(data, 32, 10**8)


def test_truncated_jpeg_is_caught_by_full_decode():
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    Image.open(io.BytesIO(truncated)).verify()  # verify() alone lets it through
    with pytest.raises(UnusableImage, match="truncated"):
        decode_image(truncated, 32, 10**8)


def test_oversized_image_rejected_before_decoding():
    with pytest.raises(UnusableImage, match="max_image_pixels"):
        decode_image(png_bytes(np.zeros((100, 100, 3), np.uint8)), 32, max_pixels=5000)


def test_folder_scan_quarantines_and_reports(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            pixels = np.full((16, 16, 3), i * 40 + (label == "b") * 7, np.uint8)
            (tmp_path / label / f"{i}.png").write_bytes(png_bytes(pixels))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "a" / "copy.png").write_bytes((tmp_path / "a" / "0.png").read_bytes())
    (tmp_path / "b" / "conflict.png").write_bytes((tmp_path / "a" / "1.png").read_bytes())
    classes, files, ignored = scan_source(tmp_path)
    result = validate_files(tmp_path, files, 16, 10**8)
    assert classes == ["a", "b"]
    assert [i["path"] for i in ignored] == ["a/.DS_Store"]
    reasons = {q["path"]: q["reason"] for q in result.quarantined}
    assert reasons["a/broken.jpg"].startswith("not a readable image")
    assert "same content labelled as a and b" in reasons["b/conflict.png"]
    assert "same content labelled as a and b" in reasons["a/1.png"]
    assert [d["path"] for d in result.duplicates] == ["a/copy.png"]
    assert sorted(a.relative for a in result.accepted) == [
        "a/0.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"
    ]


def test_too_small_class_is_a_clear_error():
    with pytest.raises(PipelineError, match="data.min_images_per_class"):
        check_class_sizes(["a", "b"], ["a"] * 10 + ["b"] * 2, ["train"] * 12, 5)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="not a folder"):
        scan_source(tmp_path / "missing")


def a_folder_of_every_outcome(root):
    """Good images in two classes (one in a sub-folder), a broken file, a same-class copy and a
    cross-class conflict: every branch of validation, spread over more files than threads."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label / "nested").mkdir(parents=True)
        for i in range(12):
            folder = root / label / ("nested" if i % 4 == 0 else "")
            (folder / f"{i:02d}.png").write_bytes(png_bytes(rng.integers(0, 256, (20 + i, 24, 3), np.uint8)))
    (root / "a" / "broken.jpg").write_bytes(b"nope")
    (root / "a" / "copy.png").write_bytes((root / "a" / "01.png").read_bytes())
    (root / "b" / "conflict.png").write_bytes((root / "a" / "02.png").read_bytes())


def test_threaded_decoding_gives_the_result_of_decoding_one_by_one(tmp_path):
    a_folder_of_every_outcome(tmp_path)
    _, files, _ = scan_source(tmp_path)
    one = validate_files(tmp_path, files, 16, 10**8, threads=1)
    scratch = np.zeros((len(files), 16, 16, 3), np.uint8)
    many = validate_files(tmp_path, files, 16, 10**8, decoded_into=scratch, threads=4)
    assert (many.quarantined, many.duplicates) == (one.quarantined, one.duplicates)
    assert [(a.relative, a.sha256) for a in many.accepted] == [(a.relative, a.sha256) for a in one.accepted]
    assert len(one.accepted) == 23 and len(one.quarantined) == 3  # 24 good less a/02 (conflict); + broken
    for threaded, serial in zip(many.accepted, one.accepted, strict=True):
        np.testing.assert_array_equal(threaded.pixels, serial.pixels)
        assert np.shares_memory(threaded.pixels, scratch)  # decoded into the caller's array, not held apart


def a_clean_flat_folder(root):
    """Nothing to reject, scanned in path order: prepare renames its scratch file into place."""
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            (root / label / f"{i:02d}.png").write_bytes(png_bytes(rng.integers(0, 256, (18, 20, 3), np.uint8)))


@pytest.mark.parametrize("folder, accepted, quarantined", [(a_folder_of_every_outcome, 23, 3),
                                                            (a_clean_flat_folder, 20, 0)])
def test_prepare_writes_the_decoded_images_in_manifest_order_and_no_scratch(tmp_path, monkeypatch, folder, accepted,
                                                                             quarantined):
    import pandas as pd

    from pipeline import paths
    from pipeline.params import load_params
    from pipeline.stages import prepare

    folder(tmp_path / "images")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    data = dataclasses.replace(params.data, source=str(tmp_path / "images"), image_size=16, min_images_per_class=2)
    params = dataclasses.replace(params, data=data)
    monkeypatch.chdir(tmp_path)
    report = prepare.run(params)
    assert (report["counts"]["accepted"], report["counts"]["quarantined"]) == (accepted, quarantined)
    assert sorted(p.name for p in paths.PREPARED_DIR.iterdir()) == sorted(
        p.name for p in (paths.MANIFEST, paths.IMAGES, paths.CLASSES, paths.PREPARE_REPORT))
    manifest, images = pd.read_csv(paths.MANIFEST), np.load(paths.IMAGES)
    assert len(images) == len(manifest) == accepted
    for row in manifest.itertuples():
        expected = decode_image((tmp_path / "images" / row.path).read_bytes(), 16, 10**8).pixels
        np.testing.assert_array_equal(images[row.index], expected)


def test_shapes_rendered_in_worker_processes_are_the_files_rendered_here(tmp_path, monkeypatch):
    from pipeline.data import shapes
    from pipeline.params import ShapesParams

    params = ShapesParams(classes=("circle", "star", "hexagon"), images_per_class=10, image_size=48, clutter=2,
                          min_size=0.2, max_size=0.4)
    monkeypatch.setattr(shapes, "RENDER_CHUNK", 4)  # 9 tasks: a pool of 2 renders them
    assert shapes.generate(params, 7, tmp_path / "here", processes=1) == 30
    assert shapes.generate(params, 7, tmp_path / "pool", processes=2) == 30
    here = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*.png"))
    assert here == sorted(p.relative_to(tmp_path / "pool") for p in (tmp_path / "pool").rglob("*.png"))
    assert len(here) == 30
    for name in here:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()
