"""The bad-image zoo, generated here: every case is converted correctly or quarantined with a
reason by prepare's validation — never a crash, never a silent drop."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
from conftest import free_port
from PIL import Image

from pipeline.data.datasets import scan_source, validate_files
from pipeline.data.images import UnusableImage, content_hash, decode_image
from pipeline.errors import PipelineError

pytestmark = pytest.mark.fault
SIZE = 32


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid(colour, mode="RGB", size=(40, 40)) -> Image.Image:
    return Image.new(mode, size, colour)


def test_png_bytes_named_jpg_are_accepted_by_content(tmp_path):
    """A PNG saved under a .jpg name (a renamed download): prepare's validation goes by the bytes,
    not the extension — accepted as the lossless PNG it is, nothing quarantined or converted."""
    root = tmp_path / "data"
    png = encode(solid((10, 200, 30)), "PNG")
    make_tree(root, {"green/leaf.jpg": png, "red/apple.jpg": encode(solid((200, 10, 10)), "JPEG", quality=95)})
    assert (root / "green" / "leaf.jpg").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    classes, files, ignored = scan_source(root)
    result = validate_files(root, files, SIZE, 10**8)
    assert classes == ["green", "red"] and ignored == []
    assert result.quarantined == [] and result.duplicates == []
    leaf = next(a for a in result.accepted if a.relative == "green/leaf.jpg")
    assert leaf.label == "green" and (leaf.width, leaf.height) == (40, 40)
    assert leaf.sha256 == content_hash(png) and leaf.conversions == []
    assert (leaf.pixels == (10, 200, 30)).all()  # exact: decoded as PNG, not through a JPEG decoder


def test_cmyk_jpeg_becomes_rgb():
    data = encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=100)  # pure cyan ink
    pixels = decode_image(data, SIZE, 10**8).pixels.astype(int)
    red, green, blue = pixels[..., 0].mean(), pixels[..., 1].mean(), pixels[..., 2].mean()
    assert red > 200 and green < 60 and blue < 60  # C=0 M=Y=100% → red


def test_palette_with_transparency_composited():
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0] * 256)
    image.info["transparency"] = 0  # index 0 (red) is fully transparent
    decoded = decode_image(encode(image, "PNG", transparency=0), SIZE, 10**8)
    assert (decoded.pixels == 255).all()  # white background, not red
    assert any("alpha" in c for c in decoded.conversions)


def test_half_transparent_rgba_blends_on_white():
    decoded = decode_image(encode(solid((0, 0, 0, 128), mode="RGBA"), "PNG"), SIZE, 10**8)
    assert 120 <= decoded.pixels.mean() <= 135


def test_one_pixel_image_is_quarantined():
    with pytest.raises(UnusableImage, match="smaller than"):
        decode_image(encode(solid((1, 2, 3), size=(1, 1)), "PNG"), SIZE, 10**8)


def test_animated_gif_and_multipage_tiff_use_the_first_frame():
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    for data in (gif, tiff):
        decoded = decode_image(data, SIZE, 10**8)
        assert decoded.pixels[..., 0].mean() > 200 and decoded.pixels[..., 2].mean() < 50
        assert any("first of 2 frames" in c for c in decoded.conversions)


def test_bomb_is_rejected_from_the_header_alone():
    """A 40-byte-scale PNG whose header claims 100000 x 100000 pixels: decoding it would need
    30 GB; only its header may be read."""
    data = bytearray(encode(solid((0, 0, 0), size=(8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    with pytest.raises(UnusableImage, match="decompression bomb"):
        decode_image(bytes(data), SIZE, max_pixels=50_000_000)


def make_tree(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_folder_zoo_every_file_accounted_for(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(solid((9, 9, 9)), "PNG"))
    good = {f"cats/cat_{i}.png": encode(solid((i * 20, 0, 0)), "PNG") for i in range(4)}
    good.update({f"dogs/dög_ünïcode_{i}.jpg": encode(solid((0, i * 20, 0)), "JPEG", quality=95)
                 for i in range(4)})
    make_tree(root, {
        **good,
        "cats/zero.jpg": b"",
        "cats/notes.jpg": b"just text",
        "cats/Thumbs.db": b"\x00" * 10,
        "dogs/.DS_Store": b"\x00" * 10,
        "dogs/tiny.png": encode(solid((1, 1, 1), size=(1, 1)), "PNG"),
    })
    os.symlink(outside, root / "cats" / "escape.png")
    os.symlink(root / "dogs" / "loop_a.png", root / "dogs" / "loop_b.png")
    os.symlink(root / "dogs" / "loop_b.png", root / "dogs" / "loop_a.png")
    classes, files, ignored = scan_source(root)
    result = validate_files(root, files, SIZE, 10**8)
    reasons = {q["path"]: q["reason"] for q in result.quarantined}
    assert classes == ["cats", "dogs"]
    assert {i["path"] for i in ignored} == {"cats/Thumbs.db", "dogs/.DS_Store"}
    assert reasons["cats/zero.jpg"].startswith("empty file")
    assert reasons["cats/notes.jpg"].startswith("not a readable image")
    assert reasons["cats/escape.png"] == "symlink points outside the data root"
    assert reasons["dogs/loop_a.png"] == reasons["dogs/loop_b.png"] == "broken or looping symlink"
    assert "smaller than" in reasons["dogs/tiny.png"]
    assert sorted(a.relative for a in result.accepted) == sorted(good)
    # every scanned file is in exactly one bucket
    assert len(result.accepted) + len(result.quarantined) + len(result.duplicates) == len(files)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    from pipeline.data.datasets import check_class_sizes

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(PipelineError, match="'b' has no usable images"):
        check_class_sizes(["a", "b"], ["a"] * 10, ["train"] * 10, 5)


def test_unreachable_mlflow_fails_fast_and_clearly(monkeypatch):
    import time

    from pipeline.tracking import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret@127.0.0.1:{free_port()}")
    started = time.monotonic()
    quoted = r"http://bob:\*\*\*@127\.0\.0\.1:\d+ is unreachable \(ConnectionRefusedError\)"
    with pytest.raises(PipelineError, match=quoted) as no:
        store.setup("transfer-pipeline")
    assert time.monotonic() - started < 30
    assert "s3cret" not in str(no.value)  # the line names the store by its URL


def test_a_library_message_that_quotes_the_url_loses_its_password():
    """store.setup's error for a server that passed the early check but failed MLflow's call
    quotes MLflow's message, which quotes the URL it called."""
    from pipeline.errors import reason

    failed = RuntimeError("API request to http://bob:s3cret@mlflow.example/api/2.0 failed\nTraceback …")
    shown = reason(failed, "http://bob:s3cret@mlflow.example")
    assert shown == "API request to http://bob:***@mlflow.example/api/2.0 failed"


def test_an_optuna_storage_that_cannot_be_opened_is_one_line_naming_it_and_the_fix(tmp_path):
    """A dead database, a misspelt scheme, a folder that is not there: each is the one line that
    `__main__` prints (store, the database's reason, the fix), never a SQLAlchemy traceback, and
    the password stays out of it."""
    from pipeline.search.storage import make_storage

    dead_database = f"postgresql://team:s3cret@127.0.0.1:{free_port()}/optuna"
    missing_folder = f"sqlite:///{tmp_path / 'missing' / 'optuna.db'}"
    cases = {
        dead_database: r"OperationalError: .*refused.* — start the database",
        "postgress://team:s3cret@db.example/optuna": r"NoSuchModuleError: .* — fix OPTUNA_STORAGE \(e\.g\.",
        missing_folder: r"OperationalError: unable to open .* — check that the file's folder",
    }
    for url, expected in cases.items():
        with pytest.raises(PipelineError, match=expected) as raised:
            make_storage(url)
        line = str(raised.value)
        assert line.startswith("Optuna storage ") and "\n" not in line and "s3cret" not in line, line
