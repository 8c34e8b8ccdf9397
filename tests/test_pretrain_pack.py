"""pretrain.pack: byte-exact HDF5 packing; pretrain.shards: lazy sharded reading, shard-aware
distributed sampling."""
from __future__ import annotations

import json
import math
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from pretrain.dataset import ORGAN2ID
from pretrain.pack import main, pack_folder
from pretrain.shards import ShardAwareSampler, ShardedImages, assign_shards

# PTCGA-like source: colon and rectum share label 6; listed in the expected packed order
PTCGA_FILES = ["colon/a.png", "colon/b.jpg", "colon/c.png", "lung/x.jpg", "lung/y.png", "rectum/r1.jpg", "rectum/r2.png"]


def _noise_image(path, seed, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


def _pil_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def ptcga_src(tmp_path):
    src = tmp_path / "ptcga"
    for k, rel in enumerate(PTCGA_FILES):
        _noise_image(src / rel, k, size=(16 + k, 24 - k))
    _noise_image(src / "thumbnail_position_map" / "thumb.png", 99)  # never packed
    return src


@pytest.fixture
def ptcga_pack(ptcga_src, tmp_path):
    report = pack_folder(ptcga_src, tmp_path / "pack", layout="ptcga200", shard_size=3)
    return ptcga_src, tmp_path / "pack", report


# ----------------------------------------------------------------------------- packing
def test_ptcga_round_trip_is_byte_exact(ptcga_pack):
    src, out, report = ptcga_pack
    assert report.count == 7 and report.skipped_count == 0
    assert [s["count"] for s in report.shards] == [3, 3, 1]
    ds = ShardedImages(out)
    assert len(ds) == 7 and ds.shard_ranges == [(0, 3), (3, 6), (6, 7)]
    assert [ds.name(i) for i in range(7)] == PTCGA_FILES
    expected_labels = [ORGAN2ID[rel.split("/")[0]] for rel in PTCGA_FILES]
    assert expected_labels == [6, 6, 6, 10, 10, 6, 6]
    assert ds.labels.tolist() == expected_labels and ds.labels.dtype == np.int64
    for i, rel in enumerate(PTCGA_FILES):
        assert ds.raw_bytes(i) == (src / rel).read_bytes(), rel
        image, label = ds[i]
        assert image.dtype == torch.uint8 and label == expected_labels[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), _pil_rgb(src / rel)), rel
    assert ds[-1][1] == 6 and ds.name(-1) == "rectum/r2.png"
    with pytest.raises(IndexError):
        ds[7]


def test_shard_files_and_index_json(ptcga_pack):
    src, out, _ = ptcga_pack
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "pathmono-shards-v1" and index["layout"] == "ptcga200"
    assert index["count"] == 7 and index["skipped_count"] == 0 and index["skipped"] == []
    assert index["shards"] == [{"file": "shard-00000.h5", "count": 3}, {"file": "shard-00001.h5", "count": 3},
                               {"file": "shard-00002.h5", "count": 1}]
    assert index["num_classes"] == 20 and index["label_names"][6] == "colon/rectosigmoid/rectum/small_intestine"
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    with h5py.File(out / "shard-00001.h5", "r") as fh:  # read back with h5py directly, not via the reader
        assert fh["labels"].dtype == np.int64 and fh["labels"][:].tolist() == [10, 10, 6]
        assert list(fh["names"].asstr()[:]) == ["lung/x.jpg", "lung/y.png", "rectum/r1.jpg"]
        assert fh["images"][2].tobytes() == (src / "rectum/r1.jpg").read_bytes()


def test_pool_workers_give_the_same_pack(ptcga_src, ptcga_pack, tmp_path):
    _, out, _ = ptcga_pack
    pack_folder(ptcga_src, tmp_path / "pool", layout="ptcga200", shard_size=3, workers=2)
    serial, pooled = ShardedImages(out), ShardedImages(tmp_path / "pool")
    assert [pooled.name(i) for i in range(7)] == PTCGA_FILES
    assert all(pooled.raw_bytes(i) == serial.raw_bytes(i) for i in range(7))


def test_existing_pack_needs_overwrite(ptcga_src, ptcga_pack):
    _, out, _ = ptcga_pack
    with pytest.raises(FileExistsError, match="overwrite"):
        pack_folder(ptcga_src, out, layout="ptcga200", shard_size=3)
    report = pack_folder(ptcga_src, out, layout="ptcga200", shard_size=5, overwrite=True)
    assert [s["count"] for s in report.shards] == [5, 2]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.h5", "shard-00001.h5"]
    assert ShardedImages(out).shard_ranges == [(0, 5), (5, 7)]


def test_unreadable_image_skip_or_error(ptcga_src, tmp_path):
    whole = ptcga_src / "lung" / "x.jpg"
    _noise_image(ptcga_src / "lung" / "big.jpg", 7, size=(64, 64))
    blob = (ptcga_src / "lung" / "big.jpg").read_bytes()
    (ptcga_src / "lung" / "big.jpg").write_bytes(blob[: len(blob) // 2])  # truncated: opens, fails to load
    report = pack_folder(ptcga_src, tmp_path / "skip", layout="ptcga200", shard_size=4, on_error="skip")
    assert report.count == 7 and report.skipped_count == 1 and report.skipped[0][0] == "lung/big.jpg"
    index = json.loads((tmp_path / "skip" / "index.json").read_text())
    assert index["skipped_count"] == 1 and index["skipped"][0]["name"] == "lung/big.jpg"
    assert "truncated" in index["skipped"][0]["reason"]
    ds = ShardedImages(tmp_path / "skip")
    assert [ds.name(i) for i in range(7)] == PTCGA_FILES and ds.raw_bytes(3) == whole.read_bytes()

    with pytest.raises(OSError, match="big.jpg"):
        pack_folder(ptcga_src, tmp_path / "strict", layout="ptcga200", shard_size=4, on_error="error")
    assert not (tmp_path / "strict" / "index.json").exists()  # no complete-pack marker
    assert not list((tmp_path / "strict").glob(".*.tmp"))  # the half-written shard was removed
    with pytest.raises(FileNotFoundError, match="strict"):
        ShardedImages(tmp_path / "strict")


def test_unknown_organ_folder(ptcga_src, tmp_path):
    _noise_image(ptcga_src / "spleen" / "s.png", 3)
    with pytest.raises(ValueError, match="spleen.*known:.*adrenal_gland"):
        pack_folder(ptcga_src, tmp_path / "out", layout="ptcga200")
    assert not (tmp_path / "out").exists()


def _split_file(path, train_imgs):
    with open(path, "wb") as fh:
        pickle.dump({"0": {"train": {"idx": list(range(len(train_imgs))), "imgs": train_imgs}}}, fh)
    return path


def test_split_file_restricts_and_checks(ptcga_src, tmp_path):
    split = _split_file(tmp_path / "split.pickle", ["b.jpg", "r2.png", "y.png"])
    pack_folder(ptcga_src, tmp_path / "train", layout="ptcga200", split="train", split_file=str(split))
    ds = ShardedImages(tmp_path / "train")
    assert [ds.name(i) for i in range(3)] == ["colon/b.jpg", "lung/y.png", "rectum/r2.png"]
    assert ds.labels.tolist() == [6, 10, 6]
    absent = _split_file(tmp_path / "absent.pickle", ["b.jpg", "missing.png"])
    with pytest.raises(ValueError, match="1 of 2 train images not found"):
        pack_folder(ptcga_src, tmp_path / "bad", layout="ptcga200", split="train", split_file=str(absent))


def test_reader_rejects_incomplete_packs(ptcga_pack):
    _, out, _ = ptcga_pack
    original = (out / "index.json").read_text()
    index = json.loads(original)
    index["shards"][1]["count"], index["count"] = 4, 8
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard-00001.h5.*says 4"):
        ShardedImages(out)
    index["count"] = 9
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="count 9 != sum of shard counts 8"):
        ShardedImages(out)
    (out / "index.json").write_text(original)
    (out / "shard-00002.h5").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.h5"):
        ShardedImages(out)


def test_cli_prints_summary(ptcga_src, tmp_path, capsys):
    assert main([str(ptcga_src), "--out", str(tmp_path / "cli"), "--shard-size", "2"]) == 0
    assert "packed 7 images into 4 shards" in capsys.readouterr().out
    assert main([str(ptcga_src), "--out", str(tmp_path / "cli")]) == 2  # refuses to overwrite
    assert "already holds a complete pack" in capsys.readouterr().err


# ----------------------------------------------------------------------------- PCam HDF5 source
def _pcam_h5_split(folder, name, n, seed):
    """Original-PCam-like ``{name}_x.h5`` / ``{name}_y.h5``; returns (x (n, 96, 96, 3), labels (n,))."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    x[:, :8] = 255  # a flat band as well as noise, so PNG filters see both
    labels = rng.integers(0, 2, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{name}_x.h5", "w") as fh:
        fh.create_dataset("x", data=x, chunks=(1, 96, 96, 3))
    with h5py.File(folder / f"{name}_y.h5", "w") as fh:
        fh.create_dataset("y", data=labels.reshape(n, 1, 1, 1))
    return x, labels.astype(np.int64)


@pytest.fixture
def pcam_h5_src(tmp_path, monkeypatch):
    monkeypatch.setattr("pretrain.pack._PCAM_H5_CHUNK", 8)  # 37 patches: 5 chunks, not aligned to shards
    src = tmp_path / "pcam"
    return src, _pcam_h5_split(src, "valid", 37, 0), _pcam_h5_split(src, "train", 5, 1)


def test_pcam_h5_round_trip_is_pixel_exact(pcam_h5_src, tmp_path, monkeypatch):
    src, (x, labels), _ = pcam_h5_src
    assert 0 < labels.sum() < 37
    reads = []
    plain_getitem = h5py.Dataset.__getitem__

    def spy(dset, key):
        if dset.name == "/x":
            reads.append(key)
        return plain_getitem(dset, key)

    with monkeypatch.context() as patch:
        patch.setattr(h5py.Dataset, "__getitem__", spy)
        report = pack_folder(src, tmp_path / "val", layout="pcam_h5", split="val", shard_size=10)
    assert reads == [slice(s, s + 8) for s in range(0, 37, 8)]  # streamed in chunks, never x[:]
    assert report.count == 37 and report.skipped_count == 0
    assert [s["count"] for s in report.shards] == [10, 10, 10, 7]
    index = json.loads((tmp_path / "val" / "index.json").read_text())
    assert index["layout"] == "pcam_h5" and index["split"] == "val" and index["count"] == 37
    assert index["label_names"] == ["normal", "tumor"] and index["num_classes"] == 2
    ds = ShardedImages(tmp_path / "val")
    assert ds.shard_ranges == [(0, 10), (10, 20), (20, 30), (30, 37)]
    assert ds.labels.tolist() == labels.tolist()
    assert [ds.name(i) for i in range(37)] == [f"valid_x.h5:{i}" for i in range(37)]
    for i in range(37):
        assert ds.raw_bytes(i)[:8] == b"\x89PNG\r\n\x1a\n"
        image, label = ds[i]
        assert label == labels[i] and np.array_equal(image.permute(1, 2, 0).numpy(), x[i]), i


def test_pcam_h5_train_split_cli_and_pool(pcam_h5_src, tmp_path, capsys):
    src, _, (x_train, labels_train) = pcam_h5_src
    argv = [str(src), "--out", str(tmp_path / "train"), "--layout", "pcam_h5", "--split", "train", "--shard-size", "2"]
    assert main(argv) == 0
    assert "packed 5 images into 3 shards" in capsys.readouterr().out
    serial = ShardedImages(tmp_path / "train")
    assert serial.labels.tolist() == labels_train.tolist() and serial.name(4) == "train_x.h5:4"
    assert np.array_equal(serial[3][0].permute(1, 2, 0).numpy(), x_train[3])
    pack_folder(src, tmp_path / "pool", layout="pcam_h5", split="valid", shard_size=10, workers=2)
    serial_val = pack_folder(src, tmp_path / "serial", layout="pcam_h5", split="valid", shard_size=10)
    pooled, serial = ShardedImages(tmp_path / "pool"), ShardedImages(tmp_path / "serial")
    assert serial_val.count == len(pooled) == 37
    assert all(pooled.raw_bytes(i) == serial.raw_bytes(i) for i in range(37))  # same order, same PNGs


def test_pcam_h5_bad_sources_name_the_file(pcam_h5_src, tmp_path):
    src, _, _ = pcam_h5_src
    (src / "valid_y.h5").unlink()
    with pytest.raises(FileNotFoundError, match="valid_y.h5"):
        pack_folder(src, tmp_path / "out", layout="pcam_h5", split="val")
    assert not (tmp_path / "out").exists()
    with h5py.File(src / "valid_y.h5", "w") as fh:
        fh.create_dataset("y", data=np.zeros((36, 1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="valid_y.h5: 36 labels for 37 images"):
        pack_folder(src, tmp_path / "out", layout="pcam_h5", split="val")
    with h5py.File(src / "valid_y.h5", "w") as fh:
        fh.create_dataset("y", data=np.full((37, 1, 1, 1), 2, np.uint8))
    with pytest.raises(ValueError, match="valid_y.h5: 37 labels are not 0/1"):
        pack_folder(src, tmp_path / "out", layout="pcam_h5", split="val")
    with h5py.File(src / "train_x.h5", "w") as fh:
        fh.create_dataset("images", data=np.zeros((5, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="train_x.h5: no dataset 'x'"):
        pack_folder(src, tmp_path / "out", layout="pcam_h5", split="train")
    (src / "train_x.h5").write_bytes(b"not hdf5")
    with pytest.raises(OSError, match="train_x.h5: not an HDF5 file"):
        pack_folder(src, tmp_path / "out", layout="pcam_h5", split="train")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- workers
def test_dataset_pickles_and_works_in_dataloader(ptcga_pack):
    _, out, _ = ptcga_pack
    ds = ShardedImages(out)
    fresh = pickle.loads(pickle.dumps(ds))
    assert fresh.raw_bytes(4) == ds.raw_bytes(4)  # ds now holds an open shard
    used = pickle.loads(pickle.dumps(ds))
    assert used._handles == {} and used.name(6) == "rectum/r2.png"
    expected = [ds[i] for i in range(len(ds))]
    loaded = list(DataLoader(ds, batch_size=None, num_workers=2))  # workers fork with open handles
    assert len(loaded) == 7
    for (x, y), (ex, ey) in zip(loaded, expected):
        assert torch.equal(x, ex) and int(y) == ey


# ----------------------------------------------------------------------------- sampling
class _Shards:
    """Just the metadata the sampler reads."""

    def __init__(self, counts):
        edges = np.cumsum([0] + counts).tolist()
        self.shard_ranges = list(zip(edges[:-1], edges[1:]))

    def __len__(self):
        return self.shard_ranges[-1][1]


def test_assign_shards_by_hand():
    assert assign_shards([4, 4, 4, 4, 4, 3], [0, 1, 2, 3, 4, 5], 3) == [[0, 3], [1, 4], [2, 5]]
    assert assign_shards([4, 4, 4, 4, 4, 3], [5, 4, 3, 2, 1, 0], 2) == [[0, 2, 4], [1, 3, 5]]
    assert assign_shards([1, 9, 5, 5], [0, 1, 2, 3], 2) == [[0, 1], [2, 3]]  # largest first: 9 | 5, 5 | 5 + 5, 1 | 9 + 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_splits_shards_across_ranks(world):
    data = _Shards([4, 4, 4, 4, 4, 3])  # 23 items: greedy loads fit within ceil(23 / world)
    n = math.ceil(23 / world)
    seqs = {}
    for epoch in range(3):
        samplers = [ShardAwareSampler(data, num_replicas=world, rank=r, seed=5) for r in range(world)]
        per_rank = []
        for r, s in enumerate(samplers):
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert len(s) == n and len(per_rank[-1]) == n
            own = s.plan()[r]
            allowed = {i for k in own for i in range(*data.shard_ranges[k])}
            assert set(per_rank[-1]) == allowed  # only (and all of) its own shards
        plans = samplers[0].plan()
        assert sorted(k for p in plans for k in p) == list(range(6))  # shards dealt disjointly
        assert set().union(*map(set, per_rank)) == set(range(23))
        assert sum(len(set(p)) for p in per_rank) == 23  # no index on two ranks
        again = ShardAwareSampler(data, num_replicas=world, rank=world - 1, seed=5)
        again.set_epoch(epoch)
        assert list(again) == per_rank[-1]  # deterministic
        seqs[epoch] = per_rank[0]
        again.set_epoch(epoch, skip=5)
        assert len(again) == n - 5 and list(again) == per_rank[-1][5:]
    assert seqs[0] != seqs[1] != seqs[2]


def test_sampler_equal_lengths_wrap_and_truncate():
    data = _Shards([4, 4, 4, 4, 4])  # 20 items, 3 ranks: loads 8, 8, 4 vs num_samples 7
    seqs = []
    for r in range(3):
        s = ShardAwareSampler(data, num_replicas=3, rank=r, shuffle=False)
        seqs.append(list(s))
    assert ShardAwareSampler(data, num_replicas=3, rank=0, shuffle=False).plan() == [[0, 3], [1, 4], [2]]
    assert seqs[0] == [0, 1, 2, 3, 12, 13, 14]  # truncated to 7
    assert seqs[1] == [4, 5, 6, 7, 16, 17, 18]
    assert seqs[2] == [8, 9, 10, 11, 8, 9, 10]  # short rank wraps round its own indices
    dropped = ShardAwareSampler(data, num_replicas=3, rank=2, shuffle=False, drop_last=True)
    assert dropped.num_samples == 6 and list(dropped) == [8, 9, 10, 11, 8, 9]


def test_sampler_falls_back_to_index_split():
    data = _Shards([5, 6])
    with pytest.warns(UserWarning, match="2 shards for 3 replicas"):
        samplers = [ShardAwareSampler(data, num_replicas=3, rank=r, seed=1) for r in range(3)]
    for epoch in (0, 1):
        for r, s in enumerate(samplers):
            s.set_epoch(epoch)
            reference = DistributedSampler(range(11), num_replicas=3, rank=r, seed=1)
            reference.set_epoch(epoch)
            assert list(s) == list(reference) and len(s) == 4


# ----------------------------------------------------------------------------- real data
def test_real_kather_tiles_round_trip(fixtures_dir, tmp_path):
    src = fixtures_dir / "patches" / "kather"
    report = pack_folder(src, tmp_path / "kather", layout="folder", shard_size=1)
    ds = ShardedImages(tmp_path / "kather")
    assert report.count == 2 and ds.shard_ranges == [(0, 1), (1, 2)] and ds.labels.tolist() == [-1, -1]
    for i, name in enumerate(["kather1.tif", "kather2.tif"]):
        assert ds.name(i) == name and ds.raw_bytes(i) == (src / name).read_bytes()
        image, _ = ds[i]
        reference = _pil_rgb(src / name)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), reference)
        assert reference.std() > 5  # real tissue, not a blank tile
