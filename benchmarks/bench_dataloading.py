"""Image loading throughput: DALI against a torch DataLoader on the same files.

    python benchmarks/bench_dataloading.py [--images DIR] [--n 256] [--size 128] [--workers 2]

Both paths decode PNG/JPEG, resize to the same target size and normalise to [-1, 1] CHW float tensors:
the torch path with PIL in DataLoader workers (what the ``torch`` loader of the trainer does), the DALI
path with one pipeline (CPU operators with ``device_id=None``; ``mixed`` decoding and GPU resizing when a
GPU is present). Prints images per second for each. Without ``--images`` it first writes phantom images
(slow: about a minute for the default 256 images of 256 px; only the loading is timed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unimedvl_core.modeling.preprocessing import to_model_tensor, to_rgb
from unimedvl_core.training.dali import DaliDecoder
from unimedvl_core.training.datasets import ImageSource


class PilImages(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = to_rgb(Image.open(self.paths[i])).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return to_model_tensor(img)


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    from unimedvl_core.data.phantoms import FAMILY_STYLES, render, sample_phantom

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = sample_phantom(rng, size=size)
        path = folder / f"{i:05d}.png"
        Image.fromarray(render(p, FAMILY_STYLES[p.family][0])).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="target side after resizing")
    parser.add_argument("--source-size", type=int, default=256, help="side of generated source images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:args.n]
        else:
            paths = write_images(Path(tmp), args.n, args.source_size)
        gpu = torch.cuda.is_available()

        loader = DataLoader(PilImages(paths, args.size), batch_size=args.batch, num_workers=args.workers)
        t0 = time.perf_counter()
        count = sum(batch.shape[0] for batch in loader)
        torch_rate = count / (time.perf_counter() - t0)

        decoder = DaliDecoder(device_id=0 if gpu else None, max_batch=args.batch, num_threads=max(args.workers, 1))
        sources = [ImageSource(path=p) for p in paths]
        sizes = [(args.size, args.size)] * len(paths)
        decoder(sources[:args.batch], sizes[:args.batch])  # build the pipeline outside the timing
        t0 = time.perf_counter()
        count = sum(len(decoder(sources[i:i + args.batch], sizes[i:i + args.batch]))
                    for i in range(0, len(sources), args.batch))
        dali_rate = count / (time.perf_counter() - t0)
    where = "GPU" if gpu else "CPU"
    print(f"images: {len(paths)} ({args.source_size}px -> {args.size}px), batch {args.batch}, workers/threads "
          f"{args.workers}")
    print(f"torch DataLoader (PIL):      {torch_rate:8.1f} images/s")
    print(f"DALI ({where}, device_id={'0' if gpu else 'None'}): {dali_rate:8.1f} images/s")


if __name__ == "__main__":
    main()
