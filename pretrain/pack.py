"""Pack millions of small image files into a few HDF5 shards (read back by pretrain/shards.py).

    python pretrain/pack.py SRC --out DIR --layout ptcga200 --split train --split-file F \
        --shard-size 10000 --on-error skip --workers 4
    python pretrain/pack.py datasets/pcam --out packed/pcam/val --layout pcam_h5 --split val

Packing (:func:`pack_folder`) stores each image's original encoded bytes verbatim (no
re-encoding, so a round trip is byte-exact) after checking that they decode. The original PCam
HDF5 files (layout ``pcam_h5``: ``SRC/{split}_x.h5`` uint8 arrays, ``SRC/{split}_y.h5`` labels)
hold no encoded files, so each patch is encoded as lossless PNG (a round trip is pixel-exact);
x is streamed in chunks, never loaded whole. A pack is

    DIR/shard-00000.h5, shard-00001.h5, ...   datasets ``images`` (vlen uint8, one encoded file
                                              per item), ``labels`` (int64), ``names`` (utf-8,
                                              path relative to SRC, or ``valid_x.h5:<row>``
                                              for pcam_h5)
    DIR/index.json                            {"format": "pathmono-shards-v1", "count", "shards",
                                              "skipped", ...}; written last, so its presence
                                              marks a complete pack
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from PIL import Image

from common.config import ArgumentParser
from common.errors import exit_on_user_error
from common.io import atomic_write_text
from common.image import decode_image
from common.logging import progress
from pretrain.dataset import (ORGAN2ID, PCAM_CLASSES, PCAM_H5_SPLITS, PCamH5, _images_under, image_items,
                              pcam_folder_items, ptcga_items)
from pretrain.shards import FORMAT, INDEX_NAME, read_index

LAYOUTS = ("ptcga200", "pcam200", "folder", "pcam_h5")
ON_ERROR = ("skip", "error")
_WRITE_BATCH = 256  # images buffered in memory before they are appended to the open shard
_PCAM_H5_CHUNK = 512  # PCam patches read from x.h5 (and PNG-encoded as one task) at a time: 14 MB
_PNG_LEVEL = 1  # zlib level: lossless at any level; 1 is ~25 % faster than PIL's 6, same size on PCam


# ============================================================================= item lists
def ptcga_all_items(root: str | Path) -> list[tuple[str, int]]:
    """Every image of PTCGA200 ``root/<organ>/<image>`` (no split file): sorted organ folders,
    then sorted names, as :func:`pretrain.dataset.ptcga_items` orders them."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: PTCGA200 folder not found")
    items = []
    for organ in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "thumbnail_position_map"):
        if organ not in ORGAN2ID:
            raise ValueError(f"{root / organ}: unknown organ folder (known: {sorted(ORGAN2ID)})")
        items += [(str(p), ORGAN2ID[organ]) for p in _images_under(root / organ)]
    if not items:
        raise FileNotFoundError(f"{root}: no images in any organ folder")
    return items


def list_items(src: str | Path, layout: str, split: str = "train", split_file: str = "",
               fold: str = "0") -> list[tuple[str, int]]:
    """[(path, label)] of a source folder in one of the file :data:`LAYOUTS`, in a deterministic order
    (``pcam_h5`` holds arrays, not files: see :func:`pcam_h5_source`)."""
    if layout == "ptcga200":
        return ptcga_items(src, split, split_file, fold) if split_file else ptcga_all_items(src)
    if layout == "pcam200":
        return pcam_folder_items(src, split)
    if layout == "folder":
        return image_items(src)
    if layout == "pcam_h5":
        raise ValueError(f"{src}: layout 'pcam_h5' holds arrays, not image files; use pcam_h5_source()")
    raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def label_names(layout: str) -> list[str]:
    """Name of each label id; PTCGA200 ids that gather several folders join them with '/'."""
    if layout == "ptcga200":
        ids = sorted(set(ORGAN2ID.values()))
        return ["/".join(sorted(o for o, i in ORGAN2ID.items() if i == k)) for k in ids]
    if layout in ("pcam200", "pcam_h5"):
        return list(PCAM_CLASSES)
    return []


@dataclass
class PCamH5Source:
    """The checked pair of original PCam files of one split."""
    x_path: Path
    y_path: Path
    labels: np.ndarray  # int64 (N,), each 0 (normal) or 1 (tumor)

    def __len__(self) -> int:
        return len(self.labels)


def _check_pcam_x(path: Path) -> None:
    with h5py.File(path, "r") as fh:
        x = fh["x"]
        if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
            raise ValueError(f"{path}: dataset 'x' must be N x H x W x 3 uint8, got {x.shape} {x.dtype}")
        if len(x) == 0:
            raise ValueError(f"{path}: dataset 'x' holds no patches")


def _read_pcam_labels(path: Path) -> np.ndarray:
    """y (N x 1 x 1 x 1, label at ``y[i][0][0][0]``) -> int64 (N,), checked to be 0 or 1."""
    with h5py.File(path, "r") as fh:
        y = fh["y"][:]
    if y.ndim == 0 or y.size == 0 or y.size % len(y):
        raise ValueError(f"{path}: dataset 'y' must be N x 1 x 1 x 1, got shape {y.shape}")
    labels = y.reshape(len(y), -1)[:, 0].astype(np.int64)  # (N,)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise ValueError(f"{path}: {len(bad)} labels are not 0/1 (first: row {bad[0]} = {labels[bad[0]]})")
    return labels


def pcam_h5_source(src: str | Path, split: str) -> PCamH5Source:
    """Check ``src/{split}_x.h5`` and ``src/{split}_y.h5`` (split ``val`` reads ``valid_*``) and read
    the labels; missing files or datasets, bad shapes and count mismatches raise naming the file."""
    name = PCAM_H5_SPLITS.get(split, split)
    for path in (Path(src) / f"{name}_x.h5", Path(src) / f"{name}_y.h5"):
        if path.is_file() and not h5py.is_hdf5(path):  # h5py's own error would not name the file
            raise OSError(f"{path}: not an HDF5 file")
    reference = PCamH5(src, split)  # checks that both files and datasets exist and their lengths agree
    _check_pcam_x(reference.x_path)
    return PCamH5Source(reference.x_path, reference.y_path, _read_pcam_labels(reference.y_path))


# ============================================================================= decode check
def read_checked(path: str) -> tuple[bytes | None, str]:
    """(file bytes, "") if the file decodes, else (None, reason). Runs in pool workers, so it
    never raises: the caller decides between skipping and failing."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
        decode_image(blob)
    except Exception as err:  # noqa: BLE001 - any failure to read or decode makes the file unusable
        return None, f"{type(err).__name__}: {err}"
    return blob, ""


@contextlib.contextmanager
def _checked_stream(paths: list[str], workers: int) -> Iterator[Iterator[tuple[bytes | None, str]]]:
    """``read_checked`` over ``paths`` in order, in a process pool when ``workers > 0``."""
    if workers <= 0:
        yield map(read_checked, paths)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield pool.imap(read_checked, paths, chunksize=32)  # imap keeps the input order


@contextlib.contextmanager
def _file_records(src: Path, items: list[tuple[str, int]], workers: int):
    """(name relative to ``src``, label, bytes or None, reason) per item of a file layout."""
    with _checked_stream([p for p, _ in items], workers) as checked:
        yield ((Path(path).relative_to(src).as_posix(), label, blob, reason)
               for (path, label), (blob, reason) in zip(items, checked))


# ============================================================================= PCam arrays -> PNG
def encode_png_chunk(patches: np.ndarray) -> list[bytes]:
    """uint8 (n, H, W, 3) -> n lossless PNG files."""
    blobs = []
    for patch in patches:
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, format="PNG", compress_level=_PNG_LEVEL)
        blobs.append(buffer.getvalue())
    return blobs


def _ordered_bounded_map(pool, fn, args, ahead: int) -> Iterator:
    """``fn`` over ``args`` in ``pool``, in order, with at most ``ahead`` tasks in flight: unlike
    ``Pool.imap``, which reads its whole input at once (here: all of x.h5 into memory)."""
    pending: deque = deque()
    for arg in args:
        pending.append(pool.apply_async(fn, (arg,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _pcam_chunks(x: h5py.Dataset, x_path: Path) -> Iterator[np.ndarray]:
    """Consecutive uint8 (<= _PCAM_H5_CHUNK, H, W, 3) slices of ``x``."""
    for start in range(0, len(x), _PCAM_H5_CHUNK):
        try:
            chunk = x[start:start + _PCAM_H5_CHUNK]
        except OSError as err:  # h5py does not name the file
            raise OSError(f"{x_path}: cannot read patches from row {start} ({err})") from err
        yield chunk


@contextlib.contextmanager
def _pcam_h5_records(source: PCamH5Source, workers: int):
    """(``"{split}_x.h5:{row}"``, label, PNG bytes, "") per patch, streamed chunk by chunk; PNG
    encoding runs in a pool of ``workers`` processes (at most 2 chunks per worker ahead) if > 0."""
    def records(encoded_chunks):
        row = 0
        for blobs in encoded_chunks:
            for blob in blobs:
                yield f"{source.x_path.name}:{row}", int(source.labels[row]), blob, ""
                row += 1

    with h5py.File(source.x_path, "r") as fh:
        chunks = _pcam_chunks(fh["x"], source.x_path)
        if workers <= 0:
            yield records(map(encode_png_chunk, chunks))
            return
        with multiprocessing.get_context().Pool(workers) as pool:
            yield records(_ordered_bounded_map(pool, encode_png_chunk, chunks, ahead=2 * workers))


# ============================================================================= writing
class _ShardWriter:
    """Appends (blob, label, name) to ``<final>.tmp`` in batches; ``commit`` renames it into place."""

    def __init__(self, final: Path):
        self.final, self.tmp = final, final.with_name(f".{final.name}.tmp")
        self.count = 0
        self._batch: list[tuple[bytes, int, str]] = []
        self._file = h5py.File(self.tmp, "w")
        self._file.attrs["format"] = FORMAT
        self._images = self._file.create_dataset("images", (0,), maxshape=(None,), chunks=(1024,),
                                                 dtype=h5py.vlen_dtype(np.uint8))
        self._labels = self._file.create_dataset("labels", (0,), maxshape=(None,), chunks=(4096,), dtype=np.int64)
        self._names = self._file.create_dataset("names", (0,), maxshape=(None,), chunks=(1024,),
                                                dtype=h5py.string_dtype("utf-8"))

    def add(self, blob: bytes, label: int, name: str) -> None:
        self._batch.append((blob, label, name))
        self.count += 1
        if len(self._batch) >= _WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        start, stop = len(self._images), len(self._images) + len(self._batch)
        blobs = np.empty(len(self._batch), dtype=object)  # filled one by one: equal lengths must not stack
        for k, (blob, _, _) in enumerate(self._batch):
            blobs[k] = np.frombuffer(blob, np.uint8)
        for dset in (self._images, self._labels, self._names):
            dset.resize((stop,))
        self._images.write_direct(blobs, dest_sel=np.s_[start:stop])  # slice assignment would broadcast
        self._labels[start:stop] = [label for _, label, _ in self._batch]
        self._names[start:stop] = [name for _, _, name in self._batch]
        self._batch = []

    def commit(self) -> dict:
        self._flush()
        self._file.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)
        return {"file": self.final.name, "count": self.count}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@dataclass
class PackReport:
    out_dir: Path
    count: int
    shards: list[dict] = field(default_factory=list)  # [{"file", "count"}]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # [(name relative to src, reason)]

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        lines = [f"packed {self.count} images into {len(self.shards)} shards in {self.out_dir} "
                 f"(skipped {self.skipped_count} unreadable)"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped[:20]]
        if self.skipped_count > 20:
            lines.append(f"  ... {self.skipped_count - 20} more in {self.out_dir / INDEX_NAME}")
        return "\n".join(lines)


def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.h5"


def _write_shards(out: Path, src: Path, records, total: int, shard_size: int, on_error: str):
    """Stream (name, label, bytes or None, reason) records into shards of ``shard_size``;
    returns (shards, skipped)."""
    shards, skipped, writer = [], [], None
    try:
        for name, label, blob, reason in progress(records, desc="pack", total=total):
            if blob is None:
                if on_error == "error":
                    raise OSError(f"{src / name}: cannot decode image ({reason})")
                skipped.append((name, reason))
                continue
            writer = writer or _ShardWriter(_shard_path(out, len(shards)))
            writer.add(blob, label, name)
            if writer.count == shard_size:
                shards.append(writer.commit())
                writer = None
        if writer is not None:
            shards.append(writer.commit())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return shards, skipped


def _remove_pack(out: Path) -> None:
    """Delete a complete pack: index.json first (the pack is then incomplete), then its shards."""
    try:
        shards = read_index(out)["shards"]
    except ValueError:  # unreadable index: its shards are unknown, they will be overwritten by name
        shards = []
    (out / INDEX_NAME).unlink()
    for shard in shards:
        with contextlib.suppress(FileNotFoundError):
            (out / shard["file"]).unlink()


def pack_folder(src: str | Path, out_dir: str | Path, *, layout: str = "ptcga200", split: str = "train",
                split_file: str = "", fold: str = "0", shard_size: int = 10000, on_error: str = "skip",
                workers: int = 0, overwrite: bool = False) -> PackReport:
    """Pack the images of ``src`` into ``out_dir`` (see the module docstring for the format).

    ``layout``: ptcga200 (``src/<organ>/<img>``, labels from ORGAN2ID, restricted to ``split`` of
    ``split_file`` fold ``fold`` when a split file is given), pcam200 (``src/<split>/{normal,tumor}/
    <case>/<img>``), folder (every image below ``src``, label -1) or pcam_h5 (``src/{split}_x.h5``
    and ``_y.h5``, split val -> valid; each patch stored as lossless PNG). ``on_error``: skip
    unreadable images (recorded in index.json) or raise OSError (pcam_h5 arrays always decode).
    ``workers > 0`` decode-checks (pcam_h5: PNG-encodes) in a process pool (same order). A complete
    pack in ``out_dir`` is only replaced with ``overwrite=True``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    src, out = Path(src), Path(out_dir)
    if (out / INDEX_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a complete pack ({INDEX_NAME}); "
                              "pass overwrite=True (--overwrite) to replace it")
    if layout == "pcam_h5":
        source = pcam_h5_source(src, split)
        total, records = len(source), _pcam_h5_records(source, workers)
    else:
        items = list_items(src, layout, split, split_file, fold)
        total, records = len(items), _file_records(src, items, workers)
    if (out / INDEX_NAME).exists():  # the source checked out: only now replace the old pack
        _remove_pack(out)
    out.mkdir(parents=True, exist_ok=True)
    with records as stream:
        shards, skipped = _write_shards(out, src, stream, total, shard_size, on_error)
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise ValueError(f"{src}: none of the {total} images could be decoded (first: {skipped[:1]})")
    names = label_names(layout)
    index = {"format": FORMAT, "layout": layout, "source": str(src.resolve()), "split": split,
             "split_file": str(split_file), "fold": str(fold), "count": count, "shards": shards,
             "num_classes": len(names), "label_names": names,
             "skipped": [{"name": n, "reason": r} for n, r in skipped], "skipped_count": len(skipped)}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return PackReport(out, count, shards, skipped)


# ============================================================================= CLI
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("src", help="source folder")
    parser.add_argument("--out", required=True, help="output folder for shard-*.h5 and index.json")
    parser.add_argument("--layout", choices=LAYOUTS, default="ptcga200", help="layout of the source folder")
    parser.add_argument("--split", default="train", help="split packed (train | val | test)")
    parser.add_argument("--split-file", default="", help="PTCGA200 3-fold split pickle (default: all images)")
    parser.add_argument("--fold", default="0", help="fold of the split file")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per HDF5 shard")
    parser.add_argument("--on-error", choices=ON_ERROR, default="skip", help="unreadable files (not pcam_h5)")
    parser.add_argument("--workers", type=int, default=0,
                        help="decode-check (pcam_h5: PNG-encode) processes (0: in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete pack in --out")
    args = parser.parse_args(argv)
    try:
        report = pack_folder(args.src, args.out, layout=args.layout, split=args.split, split_file=args.split_file,
                             fold=args.fold, shard_size=args.shard_size, on_error=args.on_error,
                             workers=args.workers, overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
