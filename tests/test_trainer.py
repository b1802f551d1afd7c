"""The trainer end to end at test scale: every stage, strict loading of its checkpoints, a SIGKILLed run
resumed to the same weights, and a two-process torchrun run on gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unimedvl_core import UniMedVL
from unimedvl_core.training.launch import main as train_main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "fixtures" / "training" / "tiny_recipe.yaml"


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    from unimedvl_core.data.phantoms import write_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(out, 24, seed=21)
    return out


def _args(run_dir, data_dir, stage, *extra):
    return ["--config", str(RECIPE), "--stage", str(stage), "--set", f"run_dir={run_dir}",
            "--set", f"data.data_dir={data_dir}", "--no-progress", *extra]


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, phantom_data):
    """A finished VAE/tokenizer stage, copied into each test's run directory."""
    run = tmp_path_factory.mktemp("stage0run")
    assert train_main(_args(run, phantom_data, 0)) == 0
    return run / "stage0"


def _with_stage0(run_dir: Path, stage0: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(stage0, run_dir / "stage0")
    return run_dir


def test_all_stages_run_and_their_checkpoints_load_strictly(tmp_path, phantom_data, stage0):
    run = _with_stage0(tmp_path / "run", stage0)
    assert (stage0 / "final" / "ae.safetensors").is_file()
    assert json.loads((stage0 / "final" / "vae_stats.json").read_text())["std"] > 0
    assert train_main(_args(run, phantom_data, "all")) == 0
    for stage in (1, 2, 3):
        out = run / f"stage{stage}"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert (out / "loss.png").is_file() and any((out / "tensorboard").iterdir())
        model = UniMedVL.from_pretrained(out / "final", progress=False)  # strict, EMA weights
        image = sorted((phantom_data / "images").glob("*.png"))[0]
        assert isinstance(model.answer(image, "How many lesions are there?", max_new_tokens=3), str)
        trained = UniMedVL.from_pretrained(out / "final", weights="model", progress=False)
        assert not torch.equal(trained.model.connector.fc1.weight, model.model.connector.fc1.weight)  # EMA lags
    # each stage starts where the previous one ended
    s1 = load_file(str(run / "stage1" / "final" / "model.safetensors"))
    s2 = load_file(str(run / "stage2" / "final" / "model.safetensors"))
    assert not torch.equal(s1["llm2vae.weight"], s2["llm2vae.weight"])
    state = json.loads((run / "stage3" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"][0]["packs"] == 4
    assert train_main(_args(run, phantom_data, 3)) == 0  # a finished stage is not retrained


def test_a_stage_needs_its_predecessor(tmp_path, phantom_data, capsys):
    assert train_main(_args(tmp_path / "run", phantom_data, 2)) == 2
    assert "stage 1 has not finished" in capsys.readouterr().err


def _train_cmd(run, data, stage, *extra):
    return [sys.executable, "-m", "unimedvl_core.training.launch", *_args(run, data, stage, *extra)]


def test_killed_run_resumes_to_the_same_weights(tmp_path, phantom_data, stage0):
    steps = ["--set", "stages.1.steps=10", "--set", "checkpoint.save_every=3"]
    straight = _with_stage0(tmp_path / "straight", stage0)
    subprocess.run(_train_cmd(straight, phantom_data, 1, *steps), check=True, capture_output=True, timeout=600)

    killed = _with_stage0(tmp_path / "killed", stage0)
    proc = subprocess.Popen(_train_cmd(killed, phantom_data, 1, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = killed / "stage1" / "checkpoints" / "0000003"
    deadline = time.time() + 300
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "stage1" / "final").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(killed, phantom_data, 1, *steps), check=True, capture_output=True, timeout=600)

    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight / "stage1" / "final" / name))
        b = load_file(str(killed / "stage1" / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    # The checkpoint it resumed from has been pruned by now; what it wrote must still load.
    assert not (killed / "stage1" / "checkpoints" / "0000003").exists()
    UniMedVL.from_pretrained(killed / "stage1" / "final", progress=False)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_torchrun_two_processes_on_gloo(tmp_path, phantom_data, stage0, strategy):
    run = _with_stage0(tmp_path / "run", stage0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unimedvl_core.training.launch",
           *_args(run, phantom_data, 1, "--set", "stages.1.steps=4", "--set", f"parallel.strategy={strategy}",
                  "--set", "parallel.activation_checkpointing=true", "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    final = run / "stage1" / "final"
    assert {p.name for p in final.glob("optimizer.*.safetensors")} == {
        "optimizer.00000-of-00002.safetensors", "optimizer.00001-of-00002.safetensors"}
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["world"] == 2 and len(state["data"]) == 2
    assert state["data"][0]["shard"] == 0 and state["data"][1]["shard"] == 1
    model = UniMedVL.from_pretrained(final, progress=False)
    assert model.generate_image("CT image with one lesion.", num_inference_steps=2, progress=False).size == (64, 64)
