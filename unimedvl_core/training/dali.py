"""NVIDIA DALI image decoding for the packer: decode, resize to each image's target size and normalise to
[-1, 1] in one DALI batch per pack. On a GPU the decode is ``mixed`` (nvJPEG) and resizing runs on the GPU;
``device_id=None`` runs the same pipeline on the CPU only (no CUDA needed).

DALI's cubic resampling is not bit-identical to PIL's bicubic; images differ by a few grey levels from the
``torch`` loader (PIL), which does not matter for training.
"""

from __future__ import annotations

import numpy as np
import torch

from .datasets import ImageSource, RecordError

__all__ = ["DaliDecoder"]


class DaliDecoder:
    def __init__(self, device_id: int | None = None, max_batch: int = 64, num_threads: int = 2):
        self.device_id, self.max_batch, self.num_threads = device_id, max_batch, num_threads
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(image, dtype=types.FLOAT, mean=[127.5] * 3, std=[127.5] * 3,
                                            output_layout="CHW")

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, sources: list[ImageSource], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Decode ``sources`` and resize each to its (width, height); returns (3, H, W) float tensors."""
        if self._pipe is None:
            self._pipe = self._build()
        out: list[torch.Tensor] = []
        for start in range(0, len(sources), self.max_batch):
            chunk = sources[start:start + self.max_batch]
            encoded = [np.frombuffer(s.read_bytes(), dtype=np.uint8) for s in chunk]
            hw = [np.array([h, w], dtype=np.float32) for w, h in sizes[start:start + self.max_batch]]
            self._pipe.feed_input("encoded", encoded)
            self._pipe.feed_input("size", hw)
            try:
                (batch,) = self._pipe.run()
            except RuntimeError as err:
                raise RecordError(f"corrupt image in a DALI batch: {err}") from None
            if self.device_id is not None:
                batch = batch.as_cpu()
            out.extend(torch.from_numpy(np.array(batch.at(i))) for i in range(len(chunk)))
        return out
