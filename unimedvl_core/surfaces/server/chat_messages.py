"""OpenAI chat messages as a UniMedVL conversation (``UniMedVL.chat``): text parts joined, ``image_url``
parts decoded (data URLs always; server-local paths only under the folder the operator allows), system and
developer turns as the system turn. A turn's images come before its text in the context."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from fastapi import HTTPException

from ...inference.conversation import as_turns
from ...io.medical_io import MedicalImage
from ...tasks.registry import Task
from .media import decode_upload
from .openai_errors import OpenAIHTTPError
from .openai_schemas import ChatMessage
from .settings import Settings

__all__ = ["image_from_url", "to_turns"]

# the name decode_upload reads the data as (it sniffs PNG/JPEG/TIFF itself)
_NAMES = {"application/dicom": "image.dcm", "application/x-npy": "image.npy"}


def _data_url(url: str, settings: Settings) -> MedicalImage:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise OpenAIHTTPError(400, "image_url: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIHTTPError(400, "image_url: the data: URL is not valid base64") from None
    return decode_upload(data, _NAMES.get(header[5:].split(";")[0].strip().lower(), "image"), settings)


def _local_file(url: str, settings: Settings) -> MedicalImage:
    root = settings.local_image_root
    if root is None:
        raise OpenAIHTTPError(400, "image_url: send the image as a data: URL (this server reads no local paths; "
                                   "its operator may allow a folder with --allow-local-images DIR)")
    root = Path(root).resolve()
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise OpenAIHTTPError(403, "image_url: the path is outside the folder this server may read")
    if not path.is_file():  # the path is not repeated: file names may name patients
        raise OpenAIHTTPError(400, "image_url: no such file in the folder this server may read")
    with path.open("rb") as handle:
        # a neutral name in errors: file names may name patients
        return decode_upload(handle.read(settings.max_upload_bytes + 1), "image" + path.suffix, settings)


def image_from_url(url: str, settings: Settings) -> MedicalImage:
    """An ``image_url``'s image: a data URL, or a file under ``settings.local_image_root``."""
    if url.startswith("data:"):
        return _data_url(url, settings)
    if url.startswith(("http://", "https://")):
        raise OpenAIHTTPError(400, "image_url: the server does not fetch remote URLs; send a data: URL")
    return _local_file(url, settings)


def _images(i: int, message: ChatMessage, settings: Settings) -> list[MedicalImage]:
    parts = [] if isinstance(message.content, str) else message.content
    images = []
    for j, part in enumerate(parts):
        if part.type != "image_url":
            continue
        param = f"messages.{i}.content.{j}.image_url"
        if message.role != "user":
            raise OpenAIHTTPError(400, f"messages[{i}]: only user messages may carry images", param)
        try:
            images.append(image_from_url(part.image_url.url, settings))
        except HTTPException as err:
            raise OpenAIHTTPError(err.status_code, f"messages[{i}].content[{j}]: {err.detail}", param) from None
    return images


def _text(i: int, message: ChatMessage, max_chars: int) -> str:
    parts = [message.content] if isinstance(message.content, str) else \
        [p.text for p in message.content if p.type == "text"]
    text = "\n".join(parts)
    if len(text) > max_chars:
        raise OpenAIHTTPError(400, f"messages[{i}]: {len(text)} characters exceed {max_chars}", f"messages.{i}")
    return text


def to_turns(messages: list[ChatMessage], settings: Settings, vqa: Task) -> list[dict]:
    """The conversation ``UniMedVL.chat`` takes, checked (roles, order, text length, image count) before
    anything is queued; text limits are the registry's (``vqa``'s question)."""
    count = sum(p.type == "image_url" for m in messages if not isinstance(m.content, str) for p in m.content)
    if count > settings.max_images_per_request:  # counted before any is decoded
        raise OpenAIHTTPError(400, f"{count} images exceed {settings.max_images_per_request} per request",
                              "messages")
    max_chars = vqa.param("question").max_length
    turns = [{"role": "system" if m.role in ("system", "developer") else m.role,
              "content": _text(i, m, max_chars), "images": _images(i, m, settings)} for i, m in enumerate(messages)]
    try:
        as_turns(turns)
    except ValueError as err:
        raise OpenAIHTTPError(400, str(err), "messages") from None
    return turns
