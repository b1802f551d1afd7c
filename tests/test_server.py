"""The inference server: every route, bad requests refused with 4xx, jobs with progress and cancel."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_core.surfaces.server.app import Settings, create_app, serve
from unimedvl_core.tasks.catalog import TASKS
from unimedvl_core.tasks.params import Param
from unimedvl_core.tasks.registry import ModelLimits, Task, TaskResult

from .conftest import random_model

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def client():
    model = random_model(seed=3)
    app = create_app(model=model, settings=Settings(token=TOKEN, max_image_pixels=1_000_000))
    with TestClient(app) as c:
        c.headers.update({"Authorization": f"Bearer {TOKEN}"})
        yield c


def png_bytes(size=(48, 40), value=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_health_info_and_auth(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["tasks"] == TASKS.names() and info["limits"]["max_image_pixels"] == 1_000_000
    assert info["tasks"][:3] == ["vqa", "report", "text_to_image"]
    assert info["limits"]["max_image_side"] == client.app.state.model.config.max_image_side
    anonymous = TestClient(client.app)
    assert anonymous.get("/health").status_code == 200  # liveness needs no token
    assert anonymous.get("/info").status_code == 401
    assert anonymous.post("/v1/generate", json={"prompt": "x"}).status_code == 401
    schema = client.get("/openapi.json").json()
    assert {"/v1/vqa", "/v1/generate", "/v1/image-to-image/edit", "/v1/jobs/{job_id}", "/v1/tasks",
            "/v1/tasks/{name}", "/v1/chat/completions", "/v1/images/generations", "/v1/models"} <= set(schema["paths"])


def test_vqa_with_png_npy_and_dicom_inputs(client):
    ramp = np.arange(64 * 64).reshape(64, 64).astype(np.int16)
    for name, data in (("a.png", png_bytes()), ("a.npy", npy_bytes(ramp)),
                       ("ct.dcm", open(get_testdata_file("CT_small.dcm"), "rb").read())):
        r = client.post("/v1/vqa", files={"image": (name, data)}, data={"question": "Any lesion?", "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["answer"], str)


def test_vqa_streams_tokens(client):
    files = {"image": ("a.png", png_bytes())}
    full = client.post("/v1/vqa", files=files, data={"question": "Describe.", "max_new_tokens": 8}).json()["answer"]
    events = []
    with client.stream("POST", "/v1/vqa", files={"image": ("a.png", png_bytes())},
                       data={"question": "Describe.", "max_new_tokens": 8, "stream": "true"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1]["done"] and events[-1]["answer"] == full
    assert "".join(e["token"] for e in events if "token" in e) == full


def test_report(client):
    r = client.post("/v1/report", files={"image": ("ct.dcm", open(get_testdata_file("CT_small.dcm"), "rb").read())},
                    data={"max_new_tokens": 6})
    assert r.status_code == 200 and isinstance(r.json()["report"], str)


def test_generate_png_and_npy_are_labelled(client):
    r = client.post("/v1/generate", json={"prompt": "CT with one lesion", "height": 32, "width": 48,
                                          "num_inference_steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-UniMedVL-Synthetic"] == "YES"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (48, 32) and image.text["SyntheticData"] == "YES"
    r = client.post("/v1/generate", json={"prompt": "CT", "height": 32, "width": 32, "num_inference_steps": 2,
                                          "output": "npy"})
    assert np.load(io.BytesIO(r.content)).shape == (32, 32, 3)


@pytest.mark.parametrize("payload,status", [
    ({"prompt": ""}, 422), ({"prompt": "x", "height": 33}, 422), ({"prompt": "x", "num_inference_steps": 500}, 422),
    ({"prompt": "x" * 5000}, 422), ({"prompt": "x", "cfg_renorm_type": "none"}, 422), ({}, 422),
    ({"prompt": "x", "height": 4096, "width": 32}, 422),
])
def test_bad_generation_requests(client, payload, status):
    assert client.post("/v1/generate", json=payload).status_code == status


def test_image_to_image_outputs(client):
    r = client.post("/v1/image-to-image/super_resolution", files={"image": ("a.png", png_bytes((16, 16)))},
                    data={"scale": 2, "num_inference_steps": 2, "output": "npy"})
    assert r.status_code == 200, r.text
    assert np.load(io.BytesIO(r.content)).shape == (32, 32, 3)
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    r = client.post("/v1/image-to-image/contrast_translation", files={"image": ("ct.dcm", ct)},
                    data={"num_inference_steps": 2, "output": "dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ds.SyntheticData == "YES" and ds.StudyInstanceUID == source.StudyInstanceUID
    old = client.post("/v1/image-to-image/super_resolution", files={"image": ("a.png", png_bytes((16, 16)))},
                      data={"scale": 4, "params": json.dumps({"scale": 2, "num_inference_steps": 1}), "output": "npy"})
    assert np.load(io.BytesIO(old.content)).shape == (32, 32, 3)  # the deprecated JSON field still works
    r = client.post("/v1/image-to-image/counterfactual", files={"image": ("a.png", png_bytes((32, 32)))},
                    data={"instruction": "Remove the lesion.", "num_inference_steps": 2})
    assert r.status_code == 200 and "X-UniMedVL-Explanation" in r.headers


@pytest.mark.parametrize("task,files,data,status", [
    ("teleport", {"image": ("a.png", png_bytes())}, {}, 404),
    ("edit", {"image": ("a.png", png_bytes())}, {}, 422),                                    # no instruction
    ("edit", {"image": ("a.png", png_bytes())}, {"instruction": "x", "warp": 1}, 422),
    ("edit", {"image": ("a.png", png_bytes())}, {"params": '{"warp": 1}'}, 422),  # the deprecated JSON field
    ("edit", {"image": ("a.png", png_bytes())}, {"instruction": "x", "params": "not json"}, 422),
    ("virtual_staining", {"image": ("a.png", b"\x89PNG broken")}, {}, 400),
    ("virtual_staining", {"image": ("a.png", b"")}, {}, 400),
    ("virtual_staining", {"image": ("big.png", png_bytes((2000, 1000)))}, {}, 413),
    ("virtual_staining", {"image": ("a.png", png_bytes())}, {"output": "dicom"}, 400),       # no DICOM source
    ("virtual_staining", {"image": ("a.png", png_bytes())}, {"num_inference_steps": 999}, 422),
])
def test_bad_image_requests_get_4xx_and_the_server_stays_up(client, task, files, data, status):
    r = client.post(f"/v1/image-to-image/{task}", files=files, data=data)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert client.get("/health").json()["status"] == "ok"


def test_jobs_report_progress_and_can_be_cancelled(client):
    r = client.post("/v1/jobs/generate", json={"prompt": "CT", "height": 32, "width": 32, "num_inference_steps": 3,
                                               "output": "npy"})
    assert r.status_code == 202
    job = r.json()["id"]
    for _ in range(200):
        status = client.get(f"/v1/jobs/{job}").json()
        if status["status"] == "done":
            break
        time.sleep(0.05)
    assert status["status"] == "done" and status["step"] == status["total"] == 3
    assert np.load(io.BytesIO(client.get(f"/v1/jobs/{job}/result").content)).shape == (32, 32, 3)

    long = client.post("/v1/jobs/image-to-image/edit", files={"image": ("a.png", png_bytes((64, 64)))},
                       data={"instruction": "x", "num_inference_steps": 30}).json()["id"]
    assert client.delete(f"/v1/jobs/{long}").status_code == 200
    for _ in range(400):
        if client.get(f"/v1/jobs/{long}").json()["status"] in ("cancelled", "done"):
            break
        time.sleep(0.05)
    assert client.get(f"/v1/jobs/{long}").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{long}/result").status_code == 409
    assert client.get("/v1/jobs/job-999999").status_code == 404


def test_serving_beyond_loopback_needs_a_token():
    def never():
        raise AssertionError("the model must not load")

    with pytest.raises(ValueError, match="needs --token"):
        serve(never, "0.0.0.0", 8999, token=None)


# ----- the task registry is the server's only source of tasks, parameters, defaults and limits -----
def test_tasks_document_is_the_registrys(client):
    model = client.app.state.model
    assert client.get("/v1/tasks").json() == TASKS.describe(ModelLimits.of(model.config))
    assert TestClient(client.app).get("/v1/tasks").status_code == 401


def test_request_schemas_expose_every_parameter_with_the_registrys_defaults(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    t2i = TASKS.get("text_to_image")
    body = schemas["GenerateRequest"]["properties"]
    assert set(body) == {p.name for p in t2i.params} | {"output"}
    for p in t2i.params:
        assert body[p.name].get("default") == p.describe()["default"], p.name
    assert body["num_inference_steps"]["maximum"] == t2i.param("num_inference_steps").maximum
    for route, name in (("vqa_v1_vqa_post", "vqa"), ("report_v1_report_post", "report")):
        form = schemas[f"Body_{route}"]["properties"]
        assert {p.name for p in TASKS.get(name).params} <= set(form)
    # editing parameters the old server did not take
    r = client.post("/v1/image-to-image/edit", files={"image": ("a.png", png_bytes((32, 32)))},
                    data={"instruction": "x", "num_inference_steps": 1, "cfg_renorm_min": 0.5,
                          "vae_posterior": "sample", "analyze_first": "false"})
    assert r.status_code == 200, r.text


def test_generation_defaults_are_the_registrys(client):
    steps = TASKS.get("text_to_image").param("num_inference_steps").default
    assert steps == 49
    job = client.post("/v1/jobs/generate", json={"prompt": "CT", "height": 32, "width": 32}).json()["id"]
    for _ in range(400):
        status = client.get(f"/v1/jobs/{job}").json()
        if status["total"]:
            break
        time.sleep(0.01)
    client.delete(f"/v1/jobs/{job}")
    assert status["total"] == steps


@pytest.mark.parametrize("method,path,kwargs,name", [
    ("post", "/v1/generate", {"json": {"prompt": "x", "num_inference_steps": 500}}, "num_inference_steps"),
    ("post", "/v1/generate", {"json": {"prompt": "x", "warp": 1}}, "warp"),
    ("post", "/v1/generate", {"json": {"prompt": "x", "height": 33, "width": 32}}, "height"),
    ("post", "/v1/image-to-image/edit", {"files": {"image": ("a.png", png_bytes())},
                                         "data": {"instruction": "x", "warp": 1}}, "warp"),
    ("post", "/v1/image-to-image/stain", {"files": {"image": ("a.png", png_bytes())},
                                          "data": {"timestep_shift": 0}}, "timestep_shift"),
    ("post", "/v1/vqa", {"files": {"image": ("a.png", png_bytes())},
                         "data": {"question": "x", "max_new_tokens": 99999}}, "max_new_tokens"),
    ("post", "/v1/vqa", {"files": {"image": ("a.png", png_bytes())}, "data": {"question": "x", "beams": 4}}, "beams"),
    ("post", "/v1/tasks/report", {"files": {"image": ("a.png", png_bytes())},
                                  "data": {"params": '{"top_p": 2}'}}, "top_p"),
])
def test_bad_parameters_are_422_naming_the_parameter(client, method, path, kwargs, name):
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 422, r.text
    assert name in json.dumps(r.json()["detail"])


def test_old_and_dashed_task_names_are_accepted(client):
    for spelling in ("stain", "virtual-staining"):
        r = client.post(f"/v1/image-to-image/{spelling}", files={"image": ("a.png", png_bytes((16, 16)))},
                        data={"num_inference_steps": 1, "output": "npy"})
        assert r.status_code == 200, r.text
        assert r.headers["X-UniMedVL-Task"] == "virtual_staining" and r.headers["X-UniMedVL-Synthetic"] == "YES"
    r = client.post("/v1/image-to-image/vqa", files={"image": ("a.png", png_bytes())})
    assert r.status_code == 404 and "virtual_staining" in r.json()["detail"]  # names the valid tasks


def test_generic_route_runs_builtin_tasks(client):
    r = client.post("/v1/tasks/vqa", files={"image": ("a.png", png_bytes())},
                    data={"params": json.dumps({"question": "Any lesion?", "max_new_tokens": 2})})
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "vqa" and isinstance(r.json()["text"], str) and r.json()["image"] is None
    r = client.post("/v1/tasks/generate", data={"params": json.dumps({"prompt": "CT", "height": 32, "width": 32,
                                                                      "num_inference_steps": 1})})
    assert r.status_code == 200 and r.headers["X-UniMedVL-Synthetic"] == "YES"
    assert client.post("/v1/tasks/edit", data={"params": '{"instruction": "x"}'}).status_code == 422  # no image
    r = client.post("/v1/tasks/teleport", data={"params": "{}"})
    assert r.status_code == 404 and "text_to_image" in r.json()["detail"]


@pytest.fixture
def echo_upper():
    """A toy text-to-text task registered for one test."""
    task = Task("echo_upper", "upper-case a text", "text", "text",
                (Param("text", "str", help="the text", required=True, max_length=100),),
                lambda model, image, params, options: TaskResult("echo_upper", text=params["text"].upper()))
    TASKS.register(task)
    try:
        yield task
    finally:
        TASKS.unregister(task.name)


def test_a_registered_task_is_served_without_server_changes(tiny_model, echo_upper):
    with TestClient(create_app(model=tiny_model)) as c:
        doc = c.get("/v1/tasks").json()
        assert echo_upper.describe() in doc["tasks"] and doc == TASKS.describe(ModelLimits.of(tiny_model.config))
        assert "echo_upper" in c.get("/info").json()["tasks"]
        r = c.post("/v1/tasks/echo_upper", data={"params": json.dumps({"text": "no effusion"})})
        assert r.status_code == 200, r.text
        assert r.json() == {"task": "echo_upper", "text": "NO EFFUSION", "image": None, "notice": None}
        r = c.post("/v1/tasks/echo-upper", data={"params": json.dumps({"text": "x" * 101})})
        assert r.status_code == 422 and "text" in r.json()["detail"]
        job = c.post("/v1/jobs/tasks/echo_upper", data={"params": '{"text": "ok"}'}).json()["id"]
        for _ in range(200):
            if c.get(f"/v1/jobs/{job}").json()["status"] == "done":
                break
            time.sleep(0.01)
        assert c.get(f"/v1/jobs/{job}/result").json()["text"] == "OK"


@pytest.mark.parametrize("task", [t.name for t in TASKS])
def test_form_fields_derived_from_any_task_read_text_values(task):
    """Multipart fields are text; every registry parameter type must come through them (numeric choices,
    intervals, booleans) and resolve to the registry's defaults."""
    from fastapi import FastAPI

    from unimedvl_core.surfaces.server.schemas import endpoint

    spec = TASKS.get(task)
    app = FastAPI()
    app.post("/x")(endpoint(lambda **values: spec.resolve(values), form=spec))
    text = {"bool": lambda v: str(v).lower(), "interval": lambda v: ",".join(map(str, v))}
    fields = {p.name: text.get(p.type, str)(p.default) for p in spec.params if p.default is not None}
    fields.update({p.name: "x" for p in spec.params if p.required})
    r = TestClient(app).post("/x", data=fields)
    assert r.status_code == 200, r.text
    assert r.json() == json.loads(json.dumps(spec.resolve(fields)))


# ----- privacy, offline documentation, documented media types -----
PATIENT = "Doe^Jane^Privacytest"
PATIENT_ID = "PID-77881234"


def _dicom_of_patient() -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT, PATIENT_ID
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _privacy_requests(ct: bytes) -> list[tuple[str, str, dict]]:
    import base64

    url = "data:application/dicom;base64," + base64.b64encode(ct).decode()
    broken = ct[: len(ct) // 3]  # the header (with the name) survives, the pixels do not
    chat = {"model": "randomly initialised", "max_tokens": 3,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Any lesion?"}]}]}
    return [
        ("post", "/v1/vqa", {"files": {"image": ("ct.dcm", ct)}, "data": {"question": "Any lesion?",
                                                                          "max_new_tokens": 3}}),
        ("post", "/v1/vqa", {"files": {"image": ("ct.dcm", ct)}, "data": {"question": "x", "max_new_tokens": 0}}),
        ("post", "/v1/report", {"files": {"image": ("ct.dcm", ct)}, "data": {"max_new_tokens": 3}}),
        ("post", "/v1/image-to-image/edit", {"files": {"image": ("ct.dcm", ct)},
                                             "data": {"instruction": "x", "num_inference_steps": 1}}),
        ("post", "/v1/image-to-image/edit", {"files": {"image": ("ct.dcm", ct)}, "data": {"instruction": "x",
                                                                                         "warp": "1"}}),
        ("post", "/v1/image-to-image/edit", {"files": {"image": ("ct.dcm", broken)}, "data": {"instruction": "x"}}),
        ("post", "/v1/tasks/vqa", {"files": {"image": ("ct.dcm", ct)},
                                   "data": {"params": json.dumps({"question": "x", "max_new_tokens": 2})}}),
        ("post", "/v1/chat/completions", {"json": chat}),
        ("post", "/v1/chat/completions", {"json": {**chat, "max_tokens": 0}}),
        ("post", "/v1/images/edits", {"files": {"image": ("ct.dcm", ct)}, "data": {"prompt": "x",
                                                                                   "num_inference_steps": "1"}}),
        ("post", "/v1/images/edits", {"files": {"image": ("ct.dcm", broken)}, "data": {"prompt": "x"}}),
    ]


def test_patient_identity_appears_in_no_response_and_no_log(client, caplog):
    """PNG, JSON and error answers carry nothing of the DICOM header (DICOM outputs, which join the
    patient's study, are the one place the identity belongs, and are not asked for here)."""
    ct = _dicom_of_patient()
    statuses = []
    with caplog.at_level(logging.DEBUG):
        for method, path, kwargs in _privacy_requests(ct):
            r = getattr(client, method)(path, **kwargs)
            statuses.append(r.status_code)
            seen = r.content + json.dumps(dict(r.headers)).encode()
            for secret in (PATIENT, "Privacytest", PATIENT_ID):
                assert secret.encode() not in seen, (path, r.status_code)
    assert statuses.count(200) == 6 and all(400 <= s < 500 for s in statuses if s != 200), statuses
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert PATIENT not in logged and PATIENT_ID not in logged and "Privacytest" not in logged


def test_api_docs_work_offline(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert sources and not [s for s in sources if s.startswith(("http:", "https:", "//"))], sources
        assets = [s for s in sources if s.endswith((".js", ".css"))]
        assert assets
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 10_000, asset


def test_every_200_is_documented(client):
    """Each route's 200 has a schema: a model for JSON, binary for images (no empty JSON schema)."""
    paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, op in operations.items():
            ok = op["responses"].get("200") or op["responses"].get("202")
            for media, body in ok["content"].items():
                assert body.get("schema"), (method, path, media)
                if media.startswith(("image/", "application/x-npy", "application/dicom")):
                    assert body["schema"] == {"type": "string", "format": "binary"}, (path, media)
            if path.startswith("/v1/image-to-image/") or path == "/v1/generate":
                assert "application/json" not in ok["content"] and "image/png" in ok["content"], path
    form = client.get("/openapi.json").json()["components"]["schemas"]
    sr = next(v for k, v in form.items() if k.startswith("Body_") and "super_resolution" in k
              and "job" not in k)["properties"]
    assert {p.name for p in TASKS.get("super_resolution").params} <= set(sr)
    assert sr["scale"]["enum"] == [2, 4] or sr["scale"].get("default") == 4


def test_serve_honours_every_model_option(monkeypatch, tmp_path):
    """``unimedvl serve`` loads through the CLI's loader (weights, dtype, device map, revision) and applies
    --seed, --model-id and --allow-local-images to the app it runs."""
    import uvicorn

    from unimedvl_core.surfaces import cli
    from unimedvl_core.surfaces.cli import main

    from .conftest import PARITY_CKPT

    ran, loaded = {}, {}
    real_load = cli.load_model

    def load_model(ckpt, **kwargs):
        loaded.update(kwargs, ckpt=ckpt)
        return real_load(ckpt, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(cli, "load_model", load_model)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    args = ["serve", "--ckpt", str(PARITY_CKPT), "--dtype", "bfloat16", "--device-map", "auto", "--seed", "42",
            "--model-id", "unimedvl-test", "--allow-local-images", str(tmp_path), "--no-progress", "--port", "9"]
    assert main(args) == 0
    assert loaded["weights"] == "ema" and loaded["device_map"] == "auto" and loaded["revision"] is None
    app = ran["app"]
    assert ran["port"] == 9 and str(app.state.model.dtype) == "torch.bfloat16"
    assert app.state.settings.local_image_root == tmp_path
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "unimedvl-test"
        seeds = [p["default"] for t in c.get("/v1/tasks").json()["tasks"] for p in t["params"] if p["name"] == "seed"]
        assert seeds and set(seeds) == {42}
    assert main(["serve", "--ckpt", str(PARITY_CKPT), "--weights", "model", "--no-progress"]) == 2  # no such file
    assert main(["serve", "--seed", "-1", "--no-progress"]) == 2


def test_a_stream_closed_early_cancels_its_job():
    """A client that goes away mid-answer frees the model: the job stops at its next piece."""
    from unimedvl_core.surfaces.server.dependencies import Runner
    from unimedvl_core.surfaces.server.streaming import stream_job
    from unimedvl_core.surfaces.server.worker import ModelWorker

    sent = []

    def make_fn(streamer):
        def fn(job):
            for i in range(200):
                streamer(f"piece{i} ")
                sent.append(i)
                time.sleep(0.005)
            return "all"
        return fn

    runner = Runner(model=None, worker=ModelWorker(), settings=Settings())
    pieces = stream_job(runner, "chat", make_fn)
    assert next(pieces) == ("token", "piece0 ")
    pieces.close()
    job = next(iter(runner.worker.jobs.values()))
    assert job.done_event.wait(5) and job.status == "cancelled" and len(sent) < 200
    full = list(stream_job(runner, "chat", make_fn))
    assert full[-1] == ("done", "all") and len(full) == 201


# ----- reports stream as VQA answers do -----
def phantom_npy() -> bytes:
    """A slice with one bright lesion, which the embedded demonstration model reports on at length."""
    image = np.zeros((64, 48), np.uint8)
    image[20:40, 10:30], image[28:32, 18:22] = 100, 230
    return npy_bytes(image)


def report_events(client, data: dict) -> list[dict]:
    with client.stream("POST", "/v1/report", files={"image": ("a.npy", phantom_npy())},
                       data={**data, "stream": "true"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def test_report_streams_tokens_and_keeps_the_modality(embedded_model):
    """The streamed report is the JSON one piece by piece, with the notice at the end; ``modality`` reaches
    the prompt in both (the demonstration model names the modality it was told)."""
    app = create_app(model=embedded_model, settings=Settings(token=TOKEN))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        r = client.post("/v1/report", files={"image": ("a.npy", phantom_npy())},
                        data={"modality": "CT", "max_new_tokens": 24})
        assert r.headers["content-type"] == "application/json" and set(r.json()) == {"report", "notice"}
        full = r.json()["report"]
        events = report_events(client, {"modality": "CT", "max_new_tokens": 24})
        assert len(events) > 3 and "".join(e["token"] for e in events[:-1]) == full
        assert events[-1] == {"done": True, "report": full, "notice": embedded_model.provenance.notice}
        assert "CT image" in full
        untold = report_events(client, {"max_new_tokens": 24})[-1]["report"]
        assert untold != full and "CT" not in untold
        assert client.post("/v1/report", files={"image": ("a.npy", phantom_npy())},
                           data={"stream": "maybe"}).status_code == 422


def test_report_route_documents_its_stream(client):
    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/v1/report"]["post"]["responses"]["200"]
    assert {"application/json", "text/event-stream"} <= set(ok["content"])
    assert "{done, report, notice}" in ok["description"]
    assert {"stream", "modality"} <= set(schema["components"]["schemas"]["Body_report_v1_report_post"]["properties"])


def test_a_report_stream_closed_after_its_first_piece_stops_the_decoding(tiny_model):
    """The client's ``report_stream`` over a real socket: whole, its pieces are the JSON report; closed after
    the first piece of a report that would run to the longest allowed, the server's job ends cancelled (it
    would end ``done`` had it decoded on) and the model is free for the next request."""
    from unimedvl_core.surfaces.client import UniMedVLClient
    from unimedvl_core.tasks.catalog import MAX_NEW_TOKENS

    from .test_openai_compat import LoopbackServer

    image = np.load(io.BytesIO(phantom_npy()))
    app = create_app(model=tiny_model, settings=Settings(token=TOKEN))
    with LoopbackServer(app) as url:
        remote = UniMedVLClient(url, TOKEN)
        assert "".join(remote.report_stream(image, max_new_tokens=12)) == remote.report(image, max_new_tokens=12)
        stream = remote.report_stream(image, max_new_tokens=MAX_NEW_TOKENS)
        assert next(stream)
        stream.close()
        job = list(app.state.worker.jobs.values())[-1]
        assert job.task == "report" and job.done_event.wait(60) and job.status == "cancelled"
        assert remote.report(image, max_new_tokens=2)
