"""camelyon/features.py: the HDF5 layout and the tile grid (checked against the slide's geometry),
features equal to the backbone applied to independently read tiles, one process vs two (torchrun,
gloo), a run SIGKILLed mid-folder and restarted, what redoes a slide, bad input on the command
line, and --max-tiles.

The slides are tiny (a few hundred px at 0.5 µm/px, so tiles are level-0 reads), their tissue a
textured pink rectangle aligned to the 8-px mask cells of 32-px tiles, so that the tiles kept at a
``min_tissue`` are known from the rectangle alone. Everything runs on one thread per process (two
cores, shared): the in-process runs and the subprocesses then compute alike, bit for bit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
import torchvision

from camelyon import features
from camelyon.config import FeatureConfig
from camelyon.model import build_model
from common.config import parse_config
from common.errors import DataError
from common.pyramidal_tiff import write_pyramidal_tiff
from common_testutils import finish, free_port, read_jsonl, start

pytestmark = pytest.mark.filterwarnings("ignore:--backbone resnet18. no --weights:UserWarning")

SEED = 3
TILE = 32  # px at 0.5 µm/px; mask cells of 8 px
MPP = 0.5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: slide -> (height, width, tissue rectangle (y0, y1, x0, x1)), every edge on the 8-px mask grid.
#: rect: tiles covered 25 % (kept at the default 0.25: the bound is inclusive), 18.75 % and 6.25 %
#: (dropped); its width is no multiple of 32 (the partial last column is no tile)
SLIDES = {
    "large": (320, 384, (32, 288, 32, 352)),  # 8 x 10 = 80 tiles
    "rect": (256, 336, (24, 136, 40, 200)),  # 26 tiles
    "small": (192, 192, (32, 96, 32, 128)),  # 2 x 3 = 6 tiles
}
TILES = {"large": 80, "rect": 26, "small": 6}


def tissue_image(height: int, width: int, rect: tuple[int, int, int, int], seed: int, zoom: int = 1) -> np.ndarray:
    """White (240) background, a textured pink rectangle with a purple patch inside (H&E-like)."""
    rng = np.random.default_rng(seed)
    y0, y1, x0, x1 = (v * zoom for v in rect)
    img = np.full((height * zoom, width * zoom, 3), 240, np.uint8)
    img[y0:y1, x0:x1] = (np.array((230, 150, 200)) + rng.integers(-40, 20, (y1 - y0, x1 - x0, 3))).clip(0, 255)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    img[cy - 8 * zoom:cy + 8 * zoom, cx - 8 * zoom:cx + 8 * zoom] = (90, 50, 150)
    return img


def write_slide(path: Path, name: str, seed: int, zoom: int = 1) -> Path:
    height, width, rect = SLIDES[name]
    write_pyramidal_tiff(path, tissue_image(height, width, rect, seed, zoom), mpp=MPP / zoom, compression="deflate")
    return path


def expected_coords(height: int, width: int, rect: tuple[int, int, int, int], side: int,
                    min_tissue: float) -> np.ndarray:
    """Level-0 top-left (x, y) of every whole grid tile whose area the rectangle covers by at least
    ``min_tissue``, row by row: from the geometry alone."""
    y0, y1, x0, x1 = rect
    kept = []
    for ty in range(0, height - side + 1, side):
        for tx in range(0, width - side + 1, side):
            covered = max(0, min(y1, ty + side) - max(y0, ty)) * max(0, min(x1, tx + side) - max(x0, tx))
            if covered / side ** 2 >= min_tissue:
                kept.append((tx, ty))
    return np.array(kept, np.int64).reshape(-1, 2)


def args(slides: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in ("--slides", slides, "--output-dir", out, "--backbone", "resnet18", "--tile-size", TILE,
                             "--tile-mpp", MPP, "--seed", SEED, "--num-workers", 0, "--device", "cpu", *extra)]


def run_here(slides: Path, out: Path, *extra) -> list[dict]:
    """features.run in this process, on one thread (as the subprocesses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return features.run(parse_config(FeatureConfig, args(slides, out, *extra)))
    finally:
        torch.set_num_threads(before)


def read_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"features": f["features"][()], "coords": f["coords"][()], "thumbnail": f["thumbnail"][()],
                "attrs": dict(f.attrs), "dtypes": {k: f[k].dtype for k in ("features", "coords", "thumbnail")}}


def assert_same_arrays(out: Path, reference: Path, stems=tuple(SLIDES)) -> None:
    for stem in stems:
        a, b = read_h5(out / f"{stem}.h5"), read_h5(reference / f"{stem}.h5")
        assert a["features"].dtype == b["features"].dtype and a["coords"].dtype == b["coords"].dtype, stem
        assert a["features"].tobytes() == b["features"].tobytes(), f"{stem}: features differ"
        assert a["coords"].tobytes() == b["coords"].tobytes(), f"{stem}: coords differ"


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def statuses(lines: list[dict]) -> dict[str, str]:
    return {line["slide"]: line["status"] for line in lines}


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feature_slides")
    for k, name in enumerate(SLIDES):
        write_slide(root / f"{name}.tif", name, seed=k + 1)
    return root


@pytest.fixture(scope="module")
def reference(slide_dir, tmp_path_factory) -> Path:
    """An uninterrupted one-process run over the folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summaries = run_here(slide_dir, out)
    assert [(s["slide"], s["status"], s["tiles"]) for s in summaries] == [
        (f"{name}.tif", "ok", TILES[name]) for name in sorted(SLIDES)]
    return out


# ============================================================================= layout and tile grid
def test_h5_layout_and_coords_are_the_tiles_the_tissue_covers(slide_dir, reference):
    for name, (height, width, rect) in SLIDES.items():
        f = read_h5(reference / f"{name}.h5")
        want = expected_coords(height, width, rect, TILE, 0.25)
        assert len(want) == TILES[name]
        assert f["dtypes"] == {"features": np.float16, "coords": np.int64, "thumbnail": np.uint8}
        assert f["features"].shape == (len(want), 512) and np.isfinite(f["features"]).all()
        assert f["coords"].tolist() == want.tolist(), name  # exactly these tiles, in row-major order
        attrs = f["attrs"]
        assert (attrs["backbone"], attrs["weights_sha256"], attrs["embed_dim"]) == \
            ("resnet18", f"random-seed{SEED}", 512)
        assert (attrs["tile_size"], attrs["tile_mpp"], attrs["tile_size_level0"], attrs["slide_mpp"]) == \
            (TILE, MPP, TILE, MPP)
        # the thumbnail is the slide at the mask's 8-px cells: tissue pink, background white
        ratio = attrs["thumbnail_ratio"]
        assert ratio == TILE / 4 and f["thumbnail"].shape == (-(-height // 8), -(-width // 8), 3)
        y0, y1, x0, x1 = (int(v / ratio) for v in rect)
        assert (f["thumbnail"][:y0] == 240).all() and (f["thumbnail"][:, x1:] == 240).all()
        assert (f["thumbnail"][y0 + 1, x0:x1, 1] < 200).all()  # green low: pink
    rect_features = read_h5(reference / "rect.h5")["features"]
    assert len(np.unique(rect_features, axis=0)) == len(rect_features)  # tiles differ, so their features do
    # the reader MIL uses: float32 features, the same coords; anything else is a DataError naming the file
    loaded = features.read_features(reference / "rect.h5")
    assert loaded["features"].dtype == np.float32 and np.array_equal(loaded["features"], rect_features)
    assert loaded["coords"].tolist() == expected_coords(*SLIDES["rect"], TILE, 0.25).tolist()
    with pytest.raises(DataError, match=f"^{reference / 'features.jsonl'}: not a features file"):
        features.read_features(reference / "features.jsonl")


def test_coords_are_level0_pixels_on_a_slide_scanned_at_twice_the_resolution(tmp_path):
    """The rect slide at 0.25 µm/px (every side doubled): 32 tile px at 0.5 µm/px are 64 level-0 px;
    the same tiles are kept, at doubled level-0 corners."""
    slide = write_slide(tmp_path / "rect40x.tif", "rect", seed=2, zoom=2)
    run_here(slide, tmp_path / "out")
    f = read_h5(tmp_path / "out" / "rect40x.h5")
    height, width, rect = SLIDES["rect"]
    want = expected_coords(2 * height, 2 * width, tuple(2 * v for v in rect), 2 * TILE, 0.25)
    assert want.tolist() == (2 * expected_coords(height, width, rect, TILE, 0.25)).tolist()
    assert f["coords"].tolist() == want.tolist()
    attrs = f["attrs"]
    assert (attrs["tile_size_level0"], attrs["slide_mpp"], attrs["tile_size"]) == (2 * TILE, MPP / 2, TILE)
    assert f["features"].shape == (26, 512)


# ============================================================================= features
def test_features_are_the_backbone_on_tiles_read_independently(slide_dir, reference):
    """Every tile of rect.tif read with OpenSlide at its coords, scaled with ImageNet's mean and std,
    through torchvision's ResNet18 (random weights of the seed, fc dropped: average-pooled layer4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    f = read_h5(reference / "rect.h5")
    with openslide.OpenSlide(str(slide_dir / "rect.tif")) as slide:
        tiles = [np.asarray(slide.read_region((int(x), int(y)), 0, (TILE, TILE)).convert("RGB"))
                 for x, y in f["coords"]]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(x).numpy()
    got = f["features"].astype(np.float32)
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * scale)
    # a check that can tell tiles apart: each stored row is closest to its own tile
    dist = ((got[:, None] - want[None]) ** 2).sum(-1)
    assert (dist.argmin(axis=1) == np.arange(len(got))).all()


# ============================================================================= one process vs two
@pytest.fixture(scope="module")
def two_process_run(slide_dir, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("two_processes") / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "camelyon/features.py", *args(slide_dir, out)]
    return out, finish(start(cmd), timeout=240)


def test_two_processes_write_the_same_feature_files_as_one(two_process_run, reference):
    out, _ = two_process_run
    assert statuses(read_jsonl(out / features.SUMMARY)) == {f"{name}.tif": "ok" for name in SLIDES}
    assert_same_arrays(out, reference)


def test_two_processes_finish_cleanly_and_share_the_slides(two_process_run):
    out, res = two_process_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    shares = json.loads((out / "work_shares.json").read_text())
    assert [s["rank"] for s in shares] == [0, 1]
    assert all(s["items"] >= 1 for s in shares)  # each process did some slides ...
    assert sum(s["items"] for s in shares) == 3 and sum(s["size"] for s in shares) == sum(TILES.values())
    sizes = sorted(s["size"] for s in shares)  # ... the largest alone on one, the two others on the other
    assert sizes in (sorted([TILES["large"], TILES["rect"] + TILES["small"]]),
                     sorted([TILES["large"] + TILES["small"], TILES["rect"]]))


# ============================================================================= kill and restart
#: features.py's main, SIGKILLed right after the second slide's .h5 file is written (before its
#: .finished record): the first slide is finished, the second written but unrecorded, the third not begun
KILLED_CHILD = """
import os, signal, sys
from camelyon import features
from camelyon.config import FeatureConfig
from common.config import parse_config
from common.errors import DataError

real_write = features.write_features
written = []

def write_then_die(path, *args, **kwargs):
    real_write(path, *args, **kwargs)
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

features.write_features = write_then_die
features.main(parse_config(FeatureConfig, sys.argv[1:]))
"""


def test_killed_run_restarts_skipping_finished_slides_and_redoes_on_overwrite_or_new_setting(slide_dir, reference,
                                                                                             tmp_path):
    out = tmp_path / "out"
    killed = finish(start([sys.executable, "-c", KILLED_CHILD, *args(slide_dir, out)]), timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # largest first: large.tif finished, rect.tif written but not recorded, small.tif not begun
    assert statuses(read_jsonl(out / features.SUMMARY)) == {"large.tif": "ok"}
    assert (out / "large.h5").is_file() and (out / "rect.h5").is_file() and not (out / "small.h5").exists()
    assert sorted(p.name for p in (out / ".finished").iterdir()) == ["large.json"]
    large, rect = identity(out / "large.h5"), identity(out / "rect.h5")

    restarted = finish(start([sys.executable, "camelyon/features.py", *args(slide_dir, out)]), timeout=120)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    lines = read_jsonl(out / features.SUMMARY)[1:]
    assert [(line["slide"], line["status"]) for line in lines] == [
        ("rect.tif", "ok"), ("small.tif", "ok"), ("large.tif", "skipped")]  # what is left, largest first
    assert identity(out / "large.h5") == large  # not rewritten
    assert identity(out / "rect.h5") != rect  # no record: redone
    assert_same_arrays(out, reference)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []

    # the same command again: nothing to do
    written = {stem: identity(out / f"{stem}.h5") for stem in SLIDES}
    assert [s["status"] for s in run_here(slide_dir, out)] == ["skipped"] * 3
    assert {stem: identity(out / f"{stem}.h5") for stem in SLIDES} == written
    # --overwrite redoes every slide, to the same arrays
    assert [s["status"] for s in run_here(slide_dir, out, "--overwrite")] == ["ok"] * 3
    assert all(identity(out / f"{stem}.h5") != written[stem] for stem in SLIDES)
    assert_same_arrays(out, reference)
    # a changed setting redoes every slide, under the new setting; then it is skipped again
    assert [s["status"] for s in run_here(slide_dir, out, "--min-tissue", "0.5")] == ["ok"] * 3
    for name, (height, width, rect) in SLIDES.items():
        f = read_h5(out / f"{name}.h5")
        assert f["coords"].tolist() == expected_coords(height, width, rect, TILE, 0.5).tolist(), name
        assert f["attrs"]["min_tissue"] == 0.5
    assert len(read_h5(out / "rect.h5")["coords"]) == 15  # the 25 %-covered tiles are gone
    assert [s["status"] for s in run_here(slide_dir, out, "--min-tissue", "0.5")] == ["skipped"] * 3
    # a deleted output redoes its slide only
    (out / "small.h5").unlink()
    assert statuses(run_here(slide_dir, out, "--min-tissue", "0.5")) == {
        "large.tif": "skipped", "rect.tif": "skipped", "small.tif": "ok"}


# ============================================================================= bad input
#: runs features.py's ``__main__`` block (runpy) once per argument list, in one interpreter (one
#: import of torch instead of six), capturing what each run prints and its exit status
CLI_CHILD = """
import contextlib, io, json, runpy, sys, traceback

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["camelyon/features.py", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("camelyon/features.py", run_name="__main__")
            status = 0
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def error_line(result: dict) -> str:
    """The run's one ``error:`` line (the last on stderr), after checking there is no traceback."""
    assert "Traceback" not in result["stderr"], result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result["stderr"].splitlines()[-1] == lines[0], result["stderr"]
    return lines[0]


def test_bad_input_is_reported_in_one_line(slide_dir, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "small.tif").write_bytes((slide_dir / "small.tif").read_bytes())
    blank = folder / "blank.tif"
    write_pyramidal_tiff(blank, np.full((192, 192, 3), 240, np.uint8), mpp=MPP, compression="deflate")
    torch.save(build_model().state_dict(), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    missing = tmp_path / "no_such_weights.pth"
    cases = {
        "folder": args(folder, tmp_path / "out_folder"),
        "one_blank": args(blank, tmp_path / "out_blank"),
        "unknown": args(folder, tmp_path / "o") + ["--backbone", "resnet9000"],
        "uni": args(folder, tmp_path / "o") + ["--backbone", "uni"],
        "missing": args(folder, tmp_path / "o") + ["--weights", missing],
        "truncated": args(folder, tmp_path / "o") + ["--backbone", "camelyon", "--weights", truncated],
    }
    res = finish(start([sys.executable, "-c", CLI_CHILD, json.dumps([[str(a) for a in v] for v in cases.values()])]),
                 timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    results = dict(zip(cases, json.loads(res.stdout.splitlines()[-1])))

    # a folder with a no-tissue slide: reported, the other slide done, exit status = failures
    folder_run = results["folder"]
    assert folder_run["status"] == 1, folder_run
    assert "Traceback" not in folder_run["stderr"]
    lines = {line["slide"]: line for line in read_jsonl(tmp_path / "out_folder" / features.SUMMARY)}
    assert statuses(lines.values()) == {"small.tif": "ok", "blank.tif": "failed"}
    assert lines["blank.tif"]["error"].startswith(f"{blank}: no tissue")
    assert (tmp_path / "out_folder" / "small.h5").is_file() and not (tmp_path / "out_folder" / "blank.h5").exists()
    assert len(read_h5(tmp_path / "out_folder" / "small.h5")["coords"]) == TILES["small"]

    # the same slide alone: a user error
    assert results["one_blank"]["status"] == 2
    assert error_line(results["one_blank"]).startswith(f"error: {blank}: no tissue")
    assert statuses(read_jsonl(tmp_path / "out_blank" / features.SUMMARY)) == {"blank.tif": "failed"}

    # backbones and weights: stopped before any slide is read
    for case in ("unknown", "uni", "missing", "truncated"):
        assert results[case]["status"] == 2, (case, results[case])
    assert error_line(results["unknown"]).startswith("error: --backbone resnet9000: unknown; one of camelyon, resnet18")
    assert error_line(results["uni"]).startswith("error: --backbone uni: needs --weights")
    assert error_line(results["missing"]) == f"error: --weights {missing}: no such file or folder"
    assert error_line(results["truncated"]).startswith(f"error: {truncated}: not a readable")
    assert not (tmp_path / "o").exists()


# ============================================================================= --max-tiles
def test_max_tiles_keeps_the_same_seeded_subset_of_the_grid(slide_dir, reference, tmp_path):
    slide = slide_dir / "rect.tif"
    run_here(slide, tmp_path / "a", "--max-tiles", "10")
    run_here(slide, tmp_path / "b", "--max-tiles", "10")
    run_here(slide, tmp_path / "c", "--max-tiles", "10", "--seed", str(SEED + 1))
    a, b, c = (read_h5(tmp_path / d / "rect.h5") for d in "abc")
    full = read_h5(reference / "rect.h5")
    grid = [tuple(xy) for xy in full["coords"].tolist()]
    picked = [tuple(xy) for xy in a["coords"].tolist()]
    assert len(picked) == len(set(picked)) == 10 and a["features"].shape == (10, 512)
    assert set(picked) <= set(grid)
    assert [grid.index(xy) for xy in picked] == sorted(grid.index(xy) for xy in picked)  # in grid order
    assert a["coords"].tobytes() == b["coords"].tobytes() and a["features"].tobytes() == b["features"].tobytes()
    rows = [grid.index(xy) for xy in picked]
    np.testing.assert_array_equal(a["features"], full["features"][rows])  # the same tiles' features
    assert c["coords"].tolist() != a["coords"].tolist()  # another seed, another subset
    # a slide with no more tiles than the cap keeps them all
    run_here(slide_dir / "small.tif", tmp_path / "d", "--max-tiles", "10")
    assert read_h5(tmp_path / "d" / "small.h5")["coords"].tolist() == read_h5(reference / "small.h5")["coords"].tolist()


def test_a_foundation_model_from_its_published_file_embeds_the_tiles(slide_dir, tmp_path):
    """kaiko ViT-S/16 (timm keys, 384-d CLS): random weights saved as the release file; features.py
    loads it strictly and each row is the ViT's CLS embedding of the tile resized to 224."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True).eval()
    weights = tmp_path / "vits16.pth"
    torch.save(vit.state_dict(), weights)
    out = tmp_path / "out"
    run_here(slide_dir / "small.tif", out, "--backbone", "kaiko-vits16", "--weights", str(weights),
             "--tile-size", str(TILE), "--tile-mpp", str(MPP))
    got = read_h5(out / "small.h5")
    assert got["features"].shape == (TILES["small"], 384)
    with h5py.File(out / "small.h5") as f:
        assert f.attrs["backbone"] == "kaiko-vits16" and f.attrs["embed_dim"] == 384
    x, y = got["coords"][0]
    with openslide.OpenSlide(str(slide_dir / "small.tif")) as s:
        tile = np.array(s.read_region((int(x), int(y)), 0, (TILE, TILE)).convert("RGB"))
    t = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    t = (t.clamp(0, 1) - 0.5) / 0.5  # kaiko: mean = std = 0.5
    with torch.no_grad():
        want = vit(t)[0].numpy()
    np.testing.assert_allclose(got["features"][0].astype(np.float32), want, atol=2e-2, rtol=2e-2)
