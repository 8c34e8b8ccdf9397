"""Restartable folder runs of camelyon/infer.py: finished slides are skipped, a slide killed mid-way
resumes from its partial map with bit-identical outputs, unreadable slides are reported and the run
goes on, a changed checkpoint or --overwrite redoes the slides."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from camelyon import infer
from camelyon.config import InferConfig
from camelyon.model import build_model
from common.errors import UserError
from common.finished import InputsFailed
from common.pyramidal_tiff import write_pyramidal_tiff
from common_testutils import finish, free_port, read_jsonl, start

OUTPUTS = (".npy", ".csv", "_heatmap.png")

#: the child process: infer.py's main, killed by SIGKILL right after the k-th save of one slide's partial map
KILLED_CHILD = """
import os, signal, sys
from camelyon import infer
from camelyon.config import InferConfig
from common.config import parse_config

slide, after = sys.argv[1], int(sys.argv[2])
real_save = infer.SlideProgress.save
saves = []

def save_then_die(self):
    real_save(self)
    if self.path.stem == slide:
        saves.append(1)
        if len(saves) == after:
            os.kill(os.getpid(), signal.SIGKILL)

infer.SlideProgress.save = save_then_die
infer.main(parse_config(InferConfig, sys.argv[3:]))
"""


def tissue_slide(path: Path, seed: int) -> Path:
    """A 1024x1024 slide: pink tissue in rows [256, 640) x cols [256, 704) (6 x 7 = 42 cells of 64 px)
    with textured noise, so that a map computed from wrong pixels cannot look right."""
    rng = np.random.default_rng(seed)
    img = np.full((1024, 1024, 3), 240, np.uint8)
    tissue = np.array((230, 150, 200)) + rng.integers(-40, 20, (384, 448, 3))
    img[256:640, 256:704] = tissue.clip(0, 255)
    img[384:512, 384:512] = (90, 50, 150)
    write_pyramidal_tiff(path, img, compression="deflate")
    return path


def corrupt_level0_tiles(path: Path) -> Path:
    """Overwrite every level-0 tile with garbage: the slide opens and its tissue mask (a coarse
    level) reads, but the first level-0 read fails inside the inference loop."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


def save_random_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_slides")
    tissue_slide(root / "a.tif", 1)
    tissue_slide(root / "b.tif", 2)
    return root


def infer_cmd(slides: Path, checkpoint: Path, out: Path, mode: str, engine: str = "tile") -> list[str]:
    """Small units of work: whole tiles of at most 2 x 2 cells, sparse tiles of at most 3 tissue cells."""
    return ["--slides", slides, "--checkpoint", checkpoint, "--output-dir", out, "--mode", mode, "--device", "cpu",
            "--num-workers", "0", "--dense-engine", engine, "--sparse-tile-tissue", "3",
            "--tile-cells", "2", "--batch-size", "4", "--flush-every", "3"]


def run_child(args: list, code: str | None = None) -> object:
    """infer.py (or ``code``) in a fresh process with one thread, so every run computes alike."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "camelyon/infer.py", *args]
    return finish(start(cmd), timeout=300)


def output_bytes(out: Path, stem: str) -> dict[str, bytes]:
    return {suffix: (out / f"{stem}{suffix}").read_bytes() for suffix in OUTPUTS}


def mtimes(out: Path, stem: str) -> list[int]:
    return [(out / f"{stem}{suffix}").stat().st_mtime_ns for suffix in OUTPUTS]


def by_slide(lines: list[dict]) -> dict[str, dict]:
    return {line["slide"]: line for line in lines}


# ============================================================================= kill and resume
@pytest.mark.parametrize("engine", ["tile", "sparse"])
def test_killed_run_resumes_mid_slide_with_identical_outputs(slide_dir, tmp_path, engine):
    """Whole tiles: 14 dense tiles of at most a 2x2-cell tile's pixels over the 6x7 tissue cells (the
    plan of camelyon/tiling.py: 2x2, 2x1 and 1x2 tiles); sparse: 16 tiles of at most 3 tissue cells
    (plan_sparse_tiles: no single column fits the cap, so boxes are halved), saved every 3 tiles. The run is SIGKILLed right after b.tif's 2nd save (6 tiles done);
    the restart skips a.tif, takes b.tif's 6 tiles from the partial file and computes the other 6 only."""
    mode, units = "dense", {"tile": 14, "sparse": 16}[engine]
    ckpt = save_random_weights(tmp_path / "model.pt", 0)
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run_child(infer_cmd(slide_dir, ckpt, reference, mode, engine)).returncode == 0

    killed = run_child(["b", "2", *infer_cmd(slide_dir, ckpt, out, mode, engine)], code=KILLED_CHILD)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = out / infer.PARTIAL / "b.npz"
    with np.load(partial) as saved:
        assert saved["done"].sum() == 6 and len(saved["done"]) == units
    assert not (out / "b.npy").exists()
    a_written = mtimes(out, "a")

    restarted = run_child(infer_cmd(slide_dir, ckpt, out, mode, engine))
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    lines = read_jsonl(out / infer.SUMMARY)
    assert (lines[0]["slide"], lines[0]["status"], lines[0]["resumed_units"]) == ("a.tif", "ok", 0)  # before the kill
    # the restart: b.tif has its tissue still to do, so the queue hands it out first (largest first)
    assert [(line["slide"], line["status"]) for line in lines[1:]] == [("b.tif", "ok"), ("a.tif", "skipped")]
    assert by_slide(lines[1:])["b.tif"]["resumed_units"] == 6
    assert mtimes(out, "a") == a_written  # a.tif was not redone
    assert not partial.exists()
    for stem in ("a", "b"):
        assert output_bytes(out, stem) == output_bytes(reference, stem)
    assert (np.load(out / "b.npy") > 0).sum() == 42


class Crash(Exception):
    """Stands for a kill in the in-process resume test."""


@pytest.mark.usefixtures("one_thread")
def test_patch_mode_resumes_from_its_batches(slide_dir, tmp_path, monkeypatch):
    """Patch mode: 42 cells in 11 batches of 4, saved every 3 batches; a crash after the 3rd save of
    b.tif (9 batches done) and a restart give the map of an uninterrupted run, bit for bit."""
    ckpt = save_random_weights(tmp_path / "model.pt", 0)
    cfg = InferConfig(slides=str(slide_dir / "b.tif"), checkpoint=str(ckpt), output_dir=str(tmp_path / "out"),
                      mode="patch", batch_size=4, flush_every=3, num_workers=0, device="cpu")
    reference = infer.run(dataclasses.replace(cfg, output_dir=str(tmp_path / "reference")))
    real_save = infer.SlideProgress.save

    def save_then_crash(self):
        real_save(self)
        if self.saves == 3:
            raise Crash

    monkeypatch.setattr(infer.SlideProgress, "save", save_then_crash)
    with pytest.raises(Crash):
        infer.run(cfg)
    monkeypatch.setattr(infer.SlideProgress, "save", real_save)
    with np.load(tmp_path / "out" / infer.PARTIAL / "b.npz") as saved:
        assert saved["done"].tolist() == [True] * 9 + [False] * 2
    resumed = infer.run(cfg)
    assert resumed[0]["resumed_units"] == 9 and reference[0]["resumed_units"] == 0
    assert output_bytes(tmp_path / "out", "b") == output_bytes(tmp_path / "reference", "b")


def test_partial_file_of_another_key_is_not_used(slide_dir, tmp_path):
    """A partial map saved under one key is ignored under another (a changed checkpoint)."""
    tm = infer.tissue_mask_at(slide_dir / "a.tif", 64.0, 1.0)
    path = tmp_path / "a.npz"
    first = infer.SlideProgress(path, key="k1", every=1)
    prob, _ = first.start(tm.mask, 4)
    prob[tm.mask] = 0.25
    first.unit_done(2)
    again = infer.SlideProgress(path, key="k1")
    prob, done = again.start(tm.mask, 4)
    assert done.tolist() == [False, False, True, False] and (prob[tm.mask] == 0.25).all() and again.resumed == 1
    other = infer.SlideProgress(path, key="k2")
    prob, done = other.start(tm.mask, 4)
    assert not done.any() and not prob.any() and other.resumed == 0
    other_plan = infer.SlideProgress(path, key="k1")
    assert not other_plan.start(tm.mask, 5)[1].any()


# ============================================================================= unreadable slides
def test_unreadable_slides_are_reported_and_the_others_finish(slide_dir, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        (folder / name).write_bytes((slide_dir / name).read_bytes())
    full = (slide_dir / "a.tif").read_bytes()
    (folder / "c_truncated.tif").write_bytes(full[:len(full) // 2])
    (folder / "d_text.svs").write_text("not a slide\n")
    corrupt_level0_tiles(tissue_slide(folder / "e_bad_tiles.tif", 3))
    write_pyramidal_tiff(folder / "f_blank.tif", np.full((1024, 1024, 3), 245, np.uint8))
    cfg = InferConfig(slides=str(folder), checkpoint=str(save_random_weights(tmp_path / "model.pt", 0)),
                      output_dir=str(tmp_path / "out"), num_workers=0, tile_cells=8)
    with pytest.raises(InputsFailed) as failure, pytest.warns(UserWarning, match="no tissue"):
        infer.main(cfg)
    assert failure.value.status == 3 and str(failure.value).startswith("3 of 6 slides failed: ")
    lines = by_slide(read_jsonl(tmp_path / "out" / infer.SUMMARY))
    assert {name: line["status"] for name, line in lines.items()} == {
        "a.tif": "ok", "b.tif": "ok", "c_truncated.tif": "failed", "d_text.svs": "failed",
        "e_bad_tiles.tif": "failed", "f_blank.tif": "ok"}
    assert lines["c_truncated.tif"]["error"].startswith(f"{folder / 'c_truncated.tif'}: OpenSlide cannot read")
    assert lines["e_bad_tiles.tif"]["error"].startswith(str(folder / "e_bad_tiles.tif"))
    assert "Decoding error" in lines["e_bad_tiles.tif"]["error"]
    assert "no tissue" in lines["f_blank.tif"]["warning"] and lines["f_blank.tif"]["tissue_cells"] == 0
    assert lines["a.tif"]["tissue_cells"] == 42 and lines["a.tif"]["seconds"] > 0
    for stem in ("a", "b", "f_blank"):
        assert all((tmp_path / "out" / f"{stem}{suffix}").is_file() for suffix in OUTPUTS)
    assert not (tmp_path / "out" / "e_bad_tiles.npy").exists()
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("3 of 6 slides failed: ")
    assert sum(line.startswith("c_truncated.tif: failed: ") for line in printed) == 1


def test_one_unreadable_slide_is_a_user_error(slide_dir, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes((slide_dir / "a.tif").read_bytes()[:1000])
    cfg = InferConfig(slides=str(bad), checkpoint=str(save_random_weights(tmp_path / "model.pt", 0)),
                      output_dir=str(tmp_path / "out"), num_workers=0)
    with pytest.raises(UserError, match=f"^{bad}: OpenSlide cannot read"):
        infer.run(cfg)
    assert read_jsonl(tmp_path / "out" / infer.SUMMARY)[0]["status"] == "failed"


def test_exit_status_counts_failures_up_to_100(slide_dir, tmp_path):
    failed = {"status": "failed", "error": "x.tif: bad"}
    assert InputsFailed([failed] * 2 + [{"status": "ok"}]).status == 2
    assert InputsFailed([failed] * 300).status == 100
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.tif").write_bytes((slide_dir / "a.tif").read_bytes())
    (folder / "b.tif").write_text("not a slide\n")
    ckpt = save_random_weights(tmp_path / "model.pt", 0)
    res = run_child(["--slides", folder, "--checkpoint", ckpt, "--output-dir", tmp_path / "out", "--device", "cpu",
                     "--num-workers", "0", "--tile-cells", "8"])
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1] == f"1 of 2 slides failed: {folder / 'b.tif'}: OpenSlide cannot read this " \
                                         "file (Unsupported or missing image file)"
    assert "Traceback" not in res.stderr


# ============================================================================= what re-runs a slide
def test_changed_checkpoint_or_setting_or_overwrite_redoes_the_slides(slide_dir, tmp_path):
    ckpt, out = save_random_weights(tmp_path / "model.pt", 0), tmp_path / "out"
    cfg = InferConfig(slides=str(slide_dir), checkpoint=str(ckpt), output_dir=str(out), num_workers=0,
                      tile_cells=8)

    def statuses(**changes) -> list[str]:
        return [s["status"] for s in infer.run(dataclasses.replace(cfg, **changes))]

    assert statuses() == ["ok", "ok"]
    first = np.load(out / "a.npy")
    written = mtimes(out, "a")
    assert statuses(num_workers=1) == ["skipped", "skipped"]  # not an output-shaping setting
    assert mtimes(out, "a") == written
    assert statuses(overwrite=True) == ["ok", "ok"]
    assert mtimes(out, "a") != written and np.array_equal(np.load(out / "a.npy"), first)
    assert statuses(nms_threshold=0.7) == ["ok", "ok"]
    assert statuses(nms_threshold=0.7) == ["skipped", "skipped"]
    save_random_weights(ckpt, 1)  # same file name, other weights
    assert statuses(nms_threshold=0.7) == ["ok", "ok"]
    assert not np.array_equal(np.load(out / "a.npy"), first)
    (out / "b.csv").unlink()  # a missing output redoes its slide only
    assert statuses(nms_threshold=0.7) == ["skipped", "ok"]
    recorded = json.loads((out / ".finished" / "a.json").read_text())
    assert recorded["summary"]["status"] == "ok"


# ============================================================================= balanced across processes
def wide_tissue_slide(path: Path, seed: int) -> Path:
    """A 1024 x 2560 slide whose tissue (rows [256, 768) x cols [256, 2304): 8 x 32 = 256 cells) is
    about six times one ``tissue_slide``'s 42 cells."""
    rng = np.random.default_rng(seed)
    img = np.full((1024, 2560, 3), 240, np.uint8)
    img[256:768, 256:2304] = (np.array((230, 150, 200)) + rng.integers(-40, 20, (512, 2048, 3))).clip(0, 255)
    write_pyramidal_tiff(path, img, compression="deflate")
    return path


def test_two_processes_share_slides_largest_first_and_neither_waits_idle(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for k in range(3):
        tissue_slide(slides / f"small_{k}.tif", 10 + k)
    wide_tissue_slide(slides / "large.tif", 9)
    ckpt = save_random_weights(tmp_path / "model.pt", 0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "camelyon/infer.py", *infer_cmd(slides, ckpt, out, "dense")[:-4], "--tile-cells", "8"]
    result = finish(start(cmd), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted((line["slide"], line["status"]) for line in read_jsonl(out / infer.SUMMARY)) == [
        ("large.tif", "ok"), ("small_0.tif", "ok"), ("small_1.tif", "ok"), ("small_2.tif", "ok")]
    shares = {s["rank"]: s for s in json.loads((out / "work_shares.json").read_text())}
    big = next(r for r, s in shares.items() if s["size"] == 256)  # the large slide's tissue cells
    other = 1 - big
    assert shares[big]["items"] == 1  # it took the large slide first and nothing else ...
    assert shares[other]["items"] == 3 and shares[other]["size"] == 3 * 42  # ... while the other took the rest
    assert all((out / f"{stem}.npy").is_file() for stem in ("large", "small_0", "small_1", "small_2"))
    assert sorted(p.name for p in (out / infer.MASKS).iterdir()) == ["large.npz", "small_0.npz", "small_1.npz",
                                                                     "small_2.npz"]
