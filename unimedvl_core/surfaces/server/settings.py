"""What the server operator decides: the bearer token and the request limits that protect the machine.

Task parameters and their bounds are not here: they are the task registry's (``unimedvl_core.tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...modeling.preprocessing import MAX_INPUT_PIXELS

__all__ = ["Settings"]


@dataclass
class Settings:
    """Server limits.

    Args:
        token: the bearer token every route but ``/health`` needs; ``None`` leaves them open (loopback only).
        max_image_pixels: the largest uploaded image, in pixels (413 beyond).
        max_upload_bytes: the largest upload (413 beyond).
        max_queue: requests waiting or running before new ones get 429.
        request_timeout: seconds a synchronous request may wait for its result (504 beyond).
        batch_window: seconds a batchable request (text-to-image; VQA and reports when the model has
            ``answer_batch``) waits for others of the same task and parameters to run with it in one call.
        max_batch: the most requests run together (1 turns batching off).
        max_images_per_request: the most images one OpenAI-compatible request may ask for (``n``) or send.
        seed: the seed of requests that give none (the registry's default when ``None``).
        model_id: the id ``GET /v1/models`` lists and OpenAI-compatible requests must name (default: the
            weights' name: the Hub id, the checkpoint folder's name, or ``unimedvl-embedded-demo``).
        local_image_root: a folder whose files ``image_url`` may name by path (``None``: data URLs only).
    """

    token: str | None = None
    max_image_pixels: int = MAX_INPUT_PIXELS
    max_upload_bytes: int = 256 * 1024 * 1024
    max_queue: int = 16
    request_timeout: float = 3600.0
    batch_window: float = 0.015
    max_batch: int = 8
    max_images_per_request: int = 4
    seed: int | None = None
    model_id: str | None = None
    local_image_root: Path | None = None
