"""A client of the UniMedVL server using only the standard library and NumPy, so that 3D Slicer (or any
Python) can talk to a server without torch installed. It sends images as ``.npy`` and receives ``.npy``.

    client = UniMedVLClient("http://127.0.0.1:8765", token=None)
    client.info()
    client.tasks()  # every task with its parameters, defaults and limits
    client.vqa(array, "Is there a pleural effusion?")
    for piece in client.vqa_stream(array, "Describe the image."): print(piece, end="")
    for piece in client.report_stream(array, modality="CT"): print(piece, end="")
    image = client.generate("CT image with two lesions.", num_inference_steps=25)
    job = client.submit_image_task("super_resolution", array, {"scale": 2}); client.wait(job, progress=print)
    client.chat([{"role": "user", "content": [{"type": "text", "text": "Any effusion?"},
                                              {"type": "image_url", "image_url": {"url": data_url(array)}}]}])
    for piece in client.chat(messages, stream=True): print(piece, end="")

``chat`` speaks the OpenAI-compatible ``/v1/chat/completions`` (docs/serving.md): messages in OpenAI's format,
images as data URLs (``data_url`` makes one from an array). Answers of the embedded demonstration model carry
its notice: ``chat`` and the streams put it in ``client.last_notice``.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["UniMedVLClient", "ServerError", "Cancelled", "data_url"]


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.message = message


class Cancelled(RuntimeError):
    """The job was cancelled."""


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def data_url(image: np.ndarray) -> str:
    """An array as the ``data:`` URL of an ``image_url`` part (``.npy``, read by the server as it is)."""
    return "data:application/x-npy;base64," + base64.b64encode(_npy(image)).decode()


def _field(value: Any) -> str:
    """A form field's text: intervals as ``START,END``, booleans lower case, objects as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return ",".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def _multipart(fields: dict[str, Any], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{_field(value)}\r\n'
                     .encode())
    for name, (filename, data, content_type) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class UniMedVLClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.last_notice: str | None = None  # the demonstration-model notice of the last streamed or chat answer

    # ----- transport -----
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 stream: bool = False):
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            payload = err.read().decode(errors="replace")
            try:
                body = json.loads(payload)
                message = body["error"]["message"] if isinstance(body.get("error"), dict) else \
                    body.get("detail", payload)
            except (json.JSONDecodeError, AttributeError):
                message = payload
            raise ServerError(err.code, message if isinstance(message, str) else json.dumps(message)) from None
        except urllib.error.URLError as err:
            raise ConnectionError(f"cannot reach the UniMedVL server at {self.url}: {err.reason}") from None
        if stream:
            return response
        with response:
            return response.read(), response.headers  # case-insensitive: servers send lower-case names

    def _json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        data, _ = self._request(method, path, body, "application/json" if body else None)
        return json.loads(data)

    def _form(self, path: str, image: np.ndarray, fields: dict, stream: bool = False):
        body, content_type = _multipart(fields, {"image": ("image.npy", _npy(image), "application/x-npy")})
        return self._request("POST", path, body, content_type, stream=stream)

    @staticmethod
    def _image(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False)

    # ----- routes -----
    def health(self) -> dict:
        return self._json("GET", "/health")

    def info(self) -> dict:
        return self._json("GET", "/info")

    def tasks(self) -> dict:
        """The server's task registry: each task's parameters, defaults and limits for its checkpoint."""
        return self._json("GET", "/v1/tasks")

    def task(self, name: str, image: np.ndarray | None = None, params: dict | None = None) -> dict | np.ndarray:
        """Runs any registered task: its text as ``{"task", "text", "image": None}``, or its image."""
        fields = {"params": params or {}, "output": "npy"}
        if image is None:
            body, content_type = _multipart(fields, {})
            data, headers = self._request("POST", f"/v1/tasks/{name}", body, content_type)
        else:
            data, headers = self._form(f"/v1/tasks/{name}", image, fields)
        return json.loads(data) if headers.get("Content-Type", "").startswith("application/json") else self._image(data)

    def vqa(self, image: np.ndarray, question: str, max_new_tokens: int | None = None, **options) -> str:
        data, _ = self._form("/v1/vqa", image, {"question": question, "max_new_tokens": max_new_tokens, **options})
        return json.loads(data)["answer"]

    def vqa_stream(self, image: np.ndarray, question: str, max_new_tokens: int | None = None,
                   **options) -> Iterator[str]:
        """Yields the answer piece by piece as the server decodes it."""
        return self._text_stream("/v1/vqa", image, {"question": question, "max_new_tokens": max_new_tokens,
                                                    **options})

    def report(self, image: np.ndarray, prompt: str | None = None, modality: str | None = None,
               max_new_tokens: int | None = None) -> str:
        data, _ = self._form("/v1/report", image, {"prompt": prompt, "modality": modality,
                                                   "max_new_tokens": max_new_tokens})
        return json.loads(data)["report"]

    def report_stream(self, image: np.ndarray, prompt: str | None = None, modality: str | None = None,
                      max_new_tokens: int | None = None, **options) -> Iterator[str]:
        """Yields the report piece by piece as the server decodes it."""
        return self._text_stream("/v1/report", image, {"prompt": prompt, "modality": modality,
                                                       "max_new_tokens": max_new_tokens, **options})

    def _text_stream(self, path: str, image: np.ndarray, fields: dict) -> Iterator[str]:
        """The ``{token}`` events of a ``stream=true`` route until ``{done}``; the notice goes to
        ``last_notice``. Closing the iterator early closes the connection, which stops the server's decoding."""
        response = self._form(path, image, {**fields, "stream": True}, stream=True)
        with response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(500, event["error"])
                if event.get("done"):
                    self.last_notice = event.get("notice")
                    return
                yield event["token"]

    def generate(self, prompt: str, **params) -> np.ndarray:
        data, headers = self._request("POST", "/v1/generate", json.dumps({"prompt": prompt, "output": "npy", **params})
                                      .encode(), "application/json")
        return self._image(data)

    def image_task(self, task: str, image: np.ndarray, params: dict | None = None) -> tuple[np.ndarray, str | None]:
        """Runs an image-to-image task; returns the image and the explanation (counterfactual) if any."""
        data, headers = self._form(f"/v1/image-to-image/{task}", image, {**(params or {}), "output": "npy"})
        return self._image(data), headers.get("X-UniMedVL-Explanation")

    # ----- OpenAI-compatible chat -----
    def model_id(self) -> str:
        """The id of the model the server serves (``GET /v1/models``)."""
        return self._json("GET", "/v1/models")["data"][0]["id"]

    def chat(self, messages: list[dict], max_tokens: int | None = None, temperature: float | None = None,
             stream: bool = False, model: str | None = None, **options) -> str | Iterator[str]:
        """The answer to the last user message with the earlier turns in the context (``/v1/chat/completions``);
        with ``stream=True`` an iterator of its pieces. ``options``: ``top_p``, ``seed``. Sampling happens
        only with a temperature > 0 (or ``top_p``); by default decoding is greedy."""
        payload = {"model": model or self.model_id(), "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature, "stream": stream, **options}
        body = json.dumps({k: v for k, v in payload.items() if v is not None}).encode()
        if stream:
            return self._chat_stream(body)
        data, _ = self._request("POST", "/v1/chat/completions", body, "application/json")
        answer = json.loads(data)
        self.last_notice = answer.get("notice")
        return answer["choices"][0]["message"]["content"]

    def _chat_stream(self, body: bytes) -> Iterator[str]:
        response = self._request("POST", "/v1/chat/completions", body, "application/json", stream=True)
        with response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(500, event["error"].get("message", "the answer failed"))
                self.last_notice = event.get("notice") or self.last_notice
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]

    # ----- jobs -----
    def submit_generate(self, prompt: str, **params) -> str:
        return self._json("POST", "/v1/jobs/generate", {"prompt": prompt, "output": "npy", **params})["id"]

    def submit_image_task(self, task: str, image: np.ndarray, params: dict | None = None) -> str:
        data, _ = self._form(f"/v1/jobs/image-to-image/{task}", image, {**(params or {}), "output": "npy"})
        return json.loads(data)["id"]

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, progress: Callable[[int, int], None] | None = None, poll: float = 0.2,
             should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, str | None]:
        """Polls a job until it ends; returns (image, explanation). ``should_cancel`` is asked on every poll."""
        while True:
            status = self.status(job_id)
            if progress is not None:
                progress(status["step"], status["total"])
            if status["status"] in ("done", "failed", "cancelled"):
                break
            if should_cancel is not None and should_cancel():
                self.cancel(job_id)
            time.sleep(poll)
        if status["status"] == "cancelled":
            raise Cancelled(job_id)
        if status["status"] == "failed":
            raise ServerError(422, status.get("error") or "job failed")
        data, headers = self._request("GET", f"/v1/jobs/{job_id}/result")
        return self._image(data), headers.get("X-UniMedVL-Explanation")
