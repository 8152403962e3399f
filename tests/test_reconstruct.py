"""The reconstruction command end to end on the tiny released-format checkpoint, with bad files in the input."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from eval.metrics import psnr
from tokenizer.official import config_from_released
from tokenizer.reconstruct import main, square_tiles, unique_names


@pytest.fixture
def tiny_setup(tmp_path, official_dir):
    released = json.loads((official_dir / "tiny_gpstoken.json").read_text())
    config = config_from_released(released["gpsconfig"], released["decoderconfig"], name="tiny")
    config = dataclasses.replace(config, partition_min_size=4)  # the tiny fixtures' partition setting
    config.to_yaml(tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml", official_dir / "tiny_gpstoken.safetensors"


def _photos(folder):
    from skimage import data

    folder.mkdir()
    Image.fromarray(data.astronaut()[::4, ::4]).save(folder / "astronaut.png")          # 128 x 128: 2x2 tiles
    Image.fromarray(data.camera()[100:180, 50:150]).save(folder / "camera.jpg")         # grey, 80 x 100
    sub = folder / "sub"
    sub.mkdir()
    Image.fromarray(data.coffee()[:70, :90]).save(sub / "astronaut.png")               # same stem elsewhere
    (folder / "readme.txt").write_text("not an image")
    good = (folder / "camera.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])


def test_reconstruct_command(tmp_path, tiny_setup):
    config, weights = tiny_setup
    inputs, out = tmp_path / "in", tmp_path / "out"
    _photos(inputs)
    result = main(["--weights", str(weights), "--config", str(config), "--input", str(inputs),
                   "--output", str(out), "--batch-size", "2", "--tokens", "12",
                   "--bias-box", "0,0,32,32,50"])
    written = json.loads((out / "metrics.json").read_text())
    assert written["count"] == 3 == result["count"]
    assert set(written["per_image"]) == {"astronaut", "astronaut_2", "camera"}
    assert list(written["unreadable"]) == [str(inputs / "broken.jpg")]
    assert written["skipped_non_images"] == [str(inputs / "readme.txt")]
    assert written["per_image"]["astronaut"]["size"] == 128 and written["per_image"]["astronaut"]["tokens"] == 4 * 12
    # PSNR in the report is that of the written files against the fitted input.
    original = square_tiles(np.asarray(Image.open(inputs / "astronaut.png")), 64, "crop", None)
    recon = np.asarray(Image.open(out / "recon" / "astronaut.png"))
    assert np.isclose(written["per_image"]["astronaut"]["psnr"], psnr(recon[None], original[None])[0])
    assert np.isclose(written["mean"]["psnr"], np.mean([m["psnr"] for m in written["per_image"].values()]))
    for sub in ("compare", "overlay"):
        assert (out / sub / "camera.png").is_file()


def test_missing_weights_and_empty_input(tmp_path, tiny_setup):
    config, weights = tiny_setup
    with pytest.raises(SystemExit, match="weights file not found"):
        main(["--weights", str(tmp_path / "nope.safetensors"), "--config", str(config),
              "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match="no images found"):
        main(["--weights", str(weights), "--config", str(config), "--input", str(tmp_path / "only_text"),
              "--output", str(tmp_path / "o")])


def test_unique_names():
    from pathlib import Path

    assert unique_names([Path("a/x.png"), Path("b/x.jpg"), Path("y.png"), Path("c/x.png")]) == ["x", "x_2", "y", "x_3"]
