"""Whole-slide reading on this machine, no dataset needed (slides built with tests/slides.py): tile positions of a
real-size 40x TILED_SPARSE level (scanned from the per-frame bytes vs decoded by pydicom, and read again from the
cache of scanned positions), level-0 region reads from a JPEG TILED_FULL slide, the text-task read of a real-size
declared slide, and the MAP's input scan of slide folders (docs/performance.md "Whole-slide images").
Prints one JSON line.

    .venv/bin/python benchmarks/bench_slides.py [--workdir DIR] [--size 8192] [--skip-decoded]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.sequence import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/slides.py builds the slides

from tests.slides import DECLARED_SIZE, build_declared_slide, build_slide  # noqa: E402
from unimedvl_core.io import slide as slide_io  # noqa: E402
from unimedvl_core.io import slide_positions  # noqa: E402
from unimedvl_core.io.dicom_files import read_dicom  # noqa: E402
from unimedvl_core.io.slide import SlideSelection, read_slide  # noqa: E402
from unimedvl_core.surfaces.deploy.inputs import scan_dicom_folder  # noqa: E402
from unimedvl_core.tasks.slides import text_task_selection  # noqa: E402

TILE = 256


def real_size_header(folder: Path) -> Path:
    """A header-only TILED_SPARSE level 0 of ``DECLARED_SIZE`` with one 256-px tile per position (112,896
    per-frame groups, ~14 MB), written once into ``folder``."""
    out = folder / "real_size_level0.dcm"
    if out.exists():
        return out
    truth = build_slide(folder / "template", size=(512, 512), encoding="raw", organization="TILED_SPARSE",
                       extras=False, levels=1)
    ds = pydicom.dcmread(truth.volume_files[0][0])
    cols, rows = DECLARED_SIZE
    across = cols // TILE
    template = ds.PerFrameFunctionalGroupsSequence[0]
    items = []
    for k in range(across * (rows // TILE)):
        item = copy.deepcopy(template)
        position = item.PlanePositionSlideSequence[0]
        position.RowPositionInTotalImagePixelMatrix = (k // across) * TILE + 1
        position.ColumnPositionInTotalImagePixelMatrix = (k % across) * TILE + 1
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.NumberOfFrames = len(items)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = cols, rows
    del ds.PixelData
    ds.save_as(out)
    return out


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def tile_positions(path: Path, decoded_too: bool) -> dict:
    """Seconds from a header read without pixels to the level's tile array: scanned, again (the per-process
    cache of scanned positions), decoded by pydicom."""
    def level():
        return slide_io._levels([(path, read_dicom(path, stop_before_pixels=True))], path.name, explicit=True)
    slide_positions.clear_scanned_positions()
    scanned, levels = timed(level)
    cached, _ = timed(level)
    out = {"frames": int(levels[0].tiles.shape[0]), "header_mb": round(path.stat().st_size / 1e6, 1),
           "scanned_s": round(scanned, 3), "cached_s": round(cached, 4)}
    if decoded_too:
        scan = slide_io._scanned_frame_positions
        slide_io._scanned_frame_positions = lambda parts: None  # pydicom decodes the per-frame groups
        try:
            decoded, again = timed(level)
        finally:
            slide_io._scanned_frame_positions = scan
        assert (again[0].tiles == levels[0].tiles).all()
        out["decoded_s"] = round(decoded, 2)
    return out


def region_reads(folder: Path, size: int) -> dict:
    """Best of 3 reads of a 2048 and a 4096 square at level 0, centred, from the slide folder."""
    out = {}
    for side in (2048, 4096):
        region = ((size - side) // 2, (size - side) // 2, side, side)
        selection = SlideSelection(region=region, level=0, max_pixels=side * side)
        seconds = [timed(lambda s=selection: read_slide(folder, s))[0] for _ in range(3)]
        out[f"region_{side}_s"] = round(min(seconds), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where built slides are kept (default: temp)")
    parser.add_argument("--size", type=int, default=8192, help="side of the JPEG TILED_FULL slide's level 0")
    parser.add_argument("--skip-decoded", action="store_true", help="skip the pydicom decoding timing (~20 s)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_slides_"))
    work.mkdir(parents=True, exist_ok=True)
    build_s, header = timed(lambda: real_size_header(work / "real_size"))
    out = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "real_size_sparse": tile_positions(header, not args.skip_decoded)}
    jpeg = work / f"jpeg_{args.size}"
    if not (jpeg / "level0.dcm").exists():
        build_slide(jpeg, size=(args.size, args.size), levels=1, extras=False)
    out["jpeg_tiled_full"] = {"size": args.size, **region_reads(jpeg, args.size)}
    declared = work / "declared"
    if not (declared / "level0.dcm").exists():
        build_declared_slide(declared)
    text_s, image = timed(lambda: read_slide(declared, text_task_selection()))
    out["declared_text_task"] = {"seconds": round(text_s, 3), "level": image.geometry["slide_region"].level,
                                 "pixels": list(image.pixels.shape[:2])}
    out["map_input_scan_s"] = {name: round(timed(lambda f=folder: scan_dicom_folder(f))[0], 3)
                               for name, folder in (("declared", declared), (f"jpeg_{args.size}", jpeg))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
