"""Quantised weights (torchao on the CPU): what is quantised, bytes, logits within the documented tolerance,
the memory-fit estimate and its error. fp8 needs an Ada/Hopper GPU: here only its refusal is tested."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from unimedvl_core import UniMedVL
from unimedvl_core.inference.embedded import DEFAULT_MODEL_DIR, load_default_model
from unimedvl_core.inference.memory_fit import (
    MemoryFitError,
    Mode,
    check_fits,
    estimate_peak_bytes,
    header_shapes,
    vae_numel,
)
from unimedvl_core.inference.memory_fit import _quantized_bytes as estimated_bytes
from unimedvl_core.inference.quantization import (
    QuantizationError,
    is_quantized_linear_weight,
    tensor_bytes,
    weight_bytes,
)
from unimedvl_core.io.checkpoint import CheckpointError

from .conftest import random_model

pytest.importorskip("torchao")

# docs/quantization.md#tolerances: relative error of the first answer step's logits against full precision
TOLERANCE = {"int8": 0.01, "nf4": 0.05}
QUESTION = "How many lesions are there?"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return random_model(seed=4).save_pretrained(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(7).random((64, 64, 3)) * 255).astype("uint8"))


def _load(path, **kw):
    return UniMedVL.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **kw)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_only_decoder_linears_are_quantised_and_bytes_are_as_estimated(tiny_ckpt, mode):
    full, quant = _load(tiny_ckpt), _load(tiny_ckpt, quantization=mode)
    full_params = dict(full.model.named_parameters())
    linears = 0
    for name, param in quant.model.named_parameters():
        if is_quantized_linear_weight(name):
            linears += 1
            assert type(param) is not nn.Parameter and type(param.data) is not torch.Tensor, name
            assert tensor_bytes(param) == pytest.approx(estimated_bytes(tuple(param.shape), mode), abs=64)
        else:
            assert type(param.data) is torch.Tensor and torch.equal(param, full_params[name]), name
    layers = full.config.llm["num_hidden_layers"]
    assert linears == layers * 2 * 7  # q, k, v, o, gate, up, down of both experts
    quantised = sum(tensor_bytes(p) for n, p in full.model.named_parameters() if is_quantized_linear_weight(n))
    saved = weight_bytes(full.model) - weight_bytes(quant.model)
    ratio = {"int8": 4, "nf4": 8}[mode]  # fp32 -> 1 byte or half a byte per weight
    assert saved >= quantised * (1 - 1 / ratio) * 0.95


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_embedded_model_logits_within_tolerance_and_greedy_answer_kept(image, mode):
    full = load_default_model(progress=False)
    quant = load_default_model(progress=False, quantization=mode)
    want = full.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    got = quant.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    error = float((got.logits[0] - want.logits[0]).norm() / want.logits[0].norm())
    assert 0 < error < TOLERANCE[mode]
    assert got.text == want.text
    assert quant.quantization == mode and f"quantization={mode}" in repr(quant)


def test_quantisation_and_task_residency_combine_bit_for_bit(image):
    quant = load_default_model(progress=False, quantization="int8")
    both = load_default_model(progress=False, quantization="int8", residency="task")
    want = quant.answer(image, QUESTION, max_new_tokens=4, output_logits=True)
    got = both.answer(image, QUESTION, max_new_tokens=4, output_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    args = dict(num_inference_steps=2, output_type="latent", progress=False)
    a = quant.generate_image("CT with one lesion", generator=torch.Generator().manual_seed(1), **args)
    b = both.generate_image("CT with one lesion", generator=torch.Generator().manual_seed(1), **args)
    assert torch.equal(a, b)


def test_bad_modes_are_refused_with_one_line():
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        load_default_model(progress=False, quantization="int3")
    with pytest.raises(QuantizationError, match="fp8.*CUDA GPU of compute capability 8.9"):
        load_default_model(progress=False, quantization="fp8")


def test_quantised_weights_are_not_saved_as_a_checkpoint(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="cannot save quantised weights"):
        _load(tiny_ckpt, quantization="int8").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "ema.safetensors").exists()


def test_memory_estimate_follows_the_mode_and_the_error_names_modes_that_fit():
    from unimedvl_core.modeling.config import UniMedVLConfig

    config = UniMedVLConfig.from_dir(DEFAULT_MODEL_DIR)
    shapes = header_shapes(DEFAULT_MODEL_DIR / "ema.safetensors")
    vae = vae_numel(DEFAULT_MODEL_DIR / "ae.safetensors")
    peaks = {(q, r): estimate_peak_bytes(shapes, vae, config, torch.bfloat16, Mode(q, r))
             for q in (None, "int8", "nf4") for r in ("all", "task")}
    for q in (None, "int8", "nf4"):
        assert peaks[(q, "task")] < peaks[(q, "all")]
    for r in ("all", "task"):
        assert peaks[(None, r)] > peaks[("int8", r)] > peaks[("nf4", r)]
    files = (DEFAULT_MODEL_DIR / "ema.safetensors", DEFAULT_MODEL_DIR / "ae.safetensors")
    budget = (peaks[("int8", "all")] + peaks[("int8", "task")]) // 2
    with pytest.raises(MemoryFitError) as err:
        check_fits(*files, config, torch.bfloat16, Mode(None, "all"), budget, "cuda:0")
    message = str(err.value)
    assert "\n" not in message and "quantization=none, residency=all needs about" in message
    assert "quantization=int8, residency=task" in message and "quantization=nf4, residency=all" in message
    assert "quantization=int8, residency=all" not in message
    with pytest.raises(MemoryFitError, match="no mode fits"):
        check_fits(*files, config, torch.bfloat16, Mode("nf4", "task"), 1000, "cuda:0")
    assert check_fits(*files, config, torch.bfloat16, Mode(), 10**12, "cuda:0") > 0


def test_released_geometry_estimates():
    """Planning figures of the released 14.6B geometry: estimates, not measurements (bench_gpu.py --modes
    measures the peaks); they catch a wrongly counted expert or a wrong quantised size."""
    from unimedvl_core.io.checkpoint import build_empty_model
    from unimedvl_core.modeling.config import UniMedVLConfig
    from unimedvl_core.modeling.vae import build_vae

    config = UniMedVLConfig.from_preset(DEFAULT_MODEL_DIR.parents[1] / "configs" / "models" / "released_14b.json")
    shapes = {k: tuple(v.shape) for k, v in build_empty_model(config).state_dict().items()}
    with torch.device("meta"):
        vae = sum(math.prod(v.shape) for v in build_vae(config.vae).state_dict().values())
    gb = {(q, r): estimate_peak_bytes(shapes, vae, config, torch.bfloat16, Mode(q, r)) / 1e9
          for q in (None, "int8", "nf4") for r in ("all", "task")}
    assert 31 < gb[(None, "all")] < 33  # calibrated on the 32 GB peak measured on an H200
    assert 17 < gb[(None, "task")] < 22  # one expert of 13 GB less, two streamed layers more
    assert 17 < gb[("int8", "all")] < 20 and 11 < gb[("nf4", "all")] < 14 and gb[("nf4", "task")] < 10


def test_every_surface_takes_the_quantization_choice(tmp_path, capsys):
    from unimedvl_core.surfaces.bundle import load_network
    from unimedvl_core.surfaces.cli import build_parser, main
    from unimedvl_core.surfaces.deploy.config import load_deploy_config

    assert main(["info", "--quantization", "int8", "--residency", "task", "--no-progress"]) == 0
    assert "quantization=int8, residency=task" in capsys.readouterr().out
    assert main(["info", "--quantization", "fp8", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: quantization='fp8' needs a CUDA GPU") and "\n" not in err
    for command in (["phantom-eval"], ["serve"], ["vqa", "--image", "x.png", "--question", "q"], ["demo"]):
        assert build_parser().parse_args([*command, "--quantization", "nf4"]).quantization == "nf4"
    assert load_network(quantization="nf4").quantization == "nf4"
    task_file = tmp_path / "tasks.yaml"
    task_file.write_text("tasks: [{task: report}]\nquantization: int8\nresidency: task\n")
    assert load_deploy_config(task_file).load_options() == {"device": None, "quantization": "int8",
                                                            "residency": "task"}
    task_file.write_text("tasks: [{task: report}]\nquantization: int4\n")
    with pytest.raises(ValueError, match="quantization must be null, int8, nf4 or fp8"):
        load_deploy_config(task_file)


def test_batch_actors_reload_the_same_mode():
    from unimedvl_core.batch.model_spec import load_spec

    ckpt, options = load_spec(load_default_model(progress=False, quantization="int8", residency="task"))
    assert ckpt is None and options["quantization"] == "int8" and options["residency"] == "task"
