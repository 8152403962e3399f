"""Tokenizer training data: sources, the seeded crop/flip, unreadable files, shards, the two partition modes."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.data import (DataConfig, FashionMNIST, PartitionSettings, TarShards, build_dataset, crop_and_flip,
                            open_source, partition_batch)
from tokenizer.partition import entropy_partition

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


def _photo(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    for label in ("n01", "n02"):  # ImageNet-style class folders
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(_photo(hash((label, i)) % 1000)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "n02" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    return tmp_path


def test_crop_and_flip_is_a_function_of_the_seed():
    image = _photo(0, 300, 400)
    def run(seed):
        return crop_and_flip(image, 256, resize=True, crop="random", hflip=True, generator=torch.Generator().manual_seed(seed))
    assert run(5).shape == (256, 256, 3) and run(5).dtype == torch.uint8
    assert torch.equal(run(5), run(5))
    assert any(not torch.equal(run(5), run(s)) for s in range(6, 12))
    centre = crop_and_flip(image, 32, resize=False, crop="center", hflip=False, generator=torch.Generator())
    assert torch.equal(centre, torch.from_numpy(image[134:166, 184:216]))  # native scale, centre crop


def test_folder_source_skips_unreadable_files_and_counts_them(image_folder, caplog):
    config = DataConfig(source="folder", path=str(image_folder), image_size=32, num_workers=0)
    dataset = build_dataset(config, PartitionSettings(num_tokens=8, min_size=4))
    assert len(dataset) == 7  # 6 photos + the broken jpg; notes.txt is listed as skipped
    assert "skipped 1 non-image file" in caplog.text
    broken = [i for i in range(len(dataset)) if dataset.source.name(i).endswith("broken.jpg")][0]
    sample = dataset[(broken, 3)]
    assert sample["skipped"] == 1 and "broken.jpg" in caplog.text
    assert sample["pixels"].shape == (32, 32, 3)
    assert sample["init_geometry"].shape == (8, 5) and sample["boxes"].shape == (8, 4)


def test_list_source_and_limit(image_folder, tmp_path):
    listing = image_folder / "train.txt"
    listing.write_text("n01/0.png\nn01/1.png\nn02/2.png\n")
    source = open_source(DataConfig(source="list", path=str(listing), limit=2))
    assert len(source) == 2 and source.load(1).shape == (40, 56, 3)
    with pytest.raises(ValueError, match="'list' needs a .txt"):
        open_source(DataConfig(source="list", path=str(image_folder)))
    with pytest.raises(ValueError, match="data.crop must be one of"):
        DataConfig(crop="middle")


def test_tar_shards_read_by_offset(tmp_path):
    images = [_photo(i) for i in range(5)]
    shards = []
    for shard in range(2):
        path = tmp_path / f"train-{shard:06d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(shard * 3, min(5, shard * 3 + 3)):
                for name, data in ((f"{i:05d}.png", _png(images[i])), (f"{i:05d}.cls", b"7")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(path)
    source = open_source(DataConfig(source="shards", path=str(tmp_path / "train-*.tar")))
    assert isinstance(source, TarShards) and len(source) == 5
    assert all(np.array_equal(source.load(i), images[i]) for i in (4, 0, 3))  # any order, across shards


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@needs_fashion
def test_fashion_mnist_idx():
    test_split = FashionMNIST(FASHION, "test")
    assert len(test_split) == 10_000
    image = test_split.load(0)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and (image[..., 0] == image[..., 2]).all()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST("/nonexistent", "train")


def test_partition_modes_agree(image_folder):
    settings = PartitionSettings(num_tokens=16, min_size=4)
    workers = build_dataset(DataConfig(path=str(image_folder), image_size=32, crop="random"), settings)
    batch_mode = build_dataset(DataConfig(path=str(image_folder), image_size=32, crop="random",
                                          partition="batch"), settings)
    keys = [(i, 2000 + i) for i in range(4)]
    from_workers = torch.utils.data.default_collate([workers[k] for k in keys])
    from_batch = torch.utils.data.default_collate([batch_mode[k] for k in keys])
    assert torch.equal(from_workers["pixels"], from_batch["pixels"]) and "init_geometry" not in from_batch
    geometry, boxes = partition_batch(from_batch["pixels"], settings)
    assert torch.equal(geometry, from_workers["init_geometry"]) and torch.equal(boxes, from_workers["boxes"])
    exact = entropy_partition(from_batch["pixels"][2].numpy(), 16, min_size=4, tile_size=32)
    assert np.array_equal(exact.geometry, geometry[2].numpy())
    on_device = partition_batch(from_batch["pixels"], settings, torch.device("cpu"))  # the `gpu` mode's code
    assert torch.equal(on_device[0], geometry) and torch.equal(on_device[1], boxes)
    held_out = open_source(DataConfig(source="photos", split="test"))
    assert {Path(held_out.name(i)).name for i in range(2)} == {"coffee.png", "retina.jpg"}
