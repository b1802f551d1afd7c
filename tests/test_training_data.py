"""Training data: format readers, curriculum files, packing, sharding, resumable and reproducible streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unimedvl_core.modeling.config import UniMedVLConfig
from unimedvl_core.modeling.tokenizer import SpecialTokenIds, load_tokenizer
from unimedvl_core.training.config import RecipeError, load_curriculum, load_recipe, load_registry
from unimedvl_core.training.datasets import RecordError, record_plan
from unimedvl_core.training.stream import NoValidSamples, Packer, SampleFactory, assemble, build_groups

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "tests" / "fixtures" / "training" / "tiny_preset.json"
RECIPE = REPO / "tests" / "fixtures" / "training" / "tiny_recipe.yaml"
TOKENIZER = REPO / "unimedvl_core" / "default_model"


def _png(path: Path, size=(64, 64), value=100) -> str:
    Image.new("RGB", size, (value, value, value)).save(path)
    return path.name


# ----- formats -----
def test_sft_plan_splits_human_turns_at_image_placeholders(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    record = {"input_img": [{"path": a}, {"path": "/" + b}],
              "message": [{"from": "human", "value": "Compare <image> with\n<image>\nWhich is larger?"},
                          {"from": "gpt", "value": "The second."}]}
    items, images = record_plan("SftJSONLIterableDataset_Ver1", record, tmp_path, np.random.default_rng(0))
    assert [(i.kind, i.loss, i.cfg, i.text, i.image) for i in items] == [
        ("text", False, False, "Compare", -1), ("vit", False, True, "", 0), ("text", False, False, "with", -1),
        ("vit", False, True, "", 1), ("text", False, False, "Which is larger?", -1),
        ("text", True, False, "The second.", -1)]
    assert images[1].path == tmp_path / b  # a leading separator is stripped
    record["input_img"] = [{"path": a}]
    with pytest.raises(RecordError, match="placeholders than images"):
        record_plan("SftJSONLIterableDataset_Ver1", record, tmp_path, np.random.default_rng(0))


def test_editing_and_counterfactual_orders(tmp_path):
    record = {"input_img": [{"path": "in.png"}], "output_img": [{"path": "out.png"}],
              "message": [{"from": "human", "value": "<image>\nRemove the effusion."},
                          {"from": "gpt", "value": "The effusion was removed."}]}
    edit, _ = record_plan("MedicalImageEditingIterableDataset_ver1", record, tmp_path, np.random.default_rng(0))
    assert [(i.kind, i.loss) for i in edit] == [("vae", False), ("vit", False), ("text", False), ("text", True),
                                                ("vae", True)]
    cf, _ = record_plan("CounterfactualMedicalIterableDataset_ver1", record, tmp_path, np.random.default_rng(0),
                        cfg_condition_images=True)
    assert [(i.kind, i.loss) for i in cf] == [("vae", False), ("vit", False), ("text", False), ("vae", True),
                                              ("text", True)]
    assert cf[0].cfg and cf[1].cfg and cf[2].cfg


def test_t2i_formats(tmp_path):
    rng = np.random.default_rng(0)
    items, images = record_plan("T2IIterableDataset_Ver1", {"output_img": [{"path": "x.png"}],
                                "message": [{"from": "human", "value": "A CT image."}]}, tmp_path, rng)
    assert [(i.kind, i.loss, i.cfg) for i in items] == [("text", False, True), ("vae", True, False)]
    row = {"image": b"\x89PNG...", "captions": json.dumps({"a": "one", "b": "two"})}
    items, _ = record_plan("t2i_pretrain", row, tmp_path, rng)
    assert items[0].text in ("one", "two")
    with pytest.raises(RecordError, match="captions"):
        record_plan("t2i_pretrain", {"image": b"x", "captions": "not json"}, tmp_path, rng)


# ----- recipe files -----
def test_curriculum_shares_are_normalised():
    s1 = load_curriculum(REPO / "configs/curriculum/stage1_foundation.yaml")
    s2 = load_curriculum(REPO / "configs/curriculum/stage2_instruction.yaml")
    s3 = load_curriculum(REPO / "configs/curriculum/stage3_unified.yaml")
    assert s1 == {"i2t": 0.75, "t2i": 0.25}
    assert s2 == pytest.approx({"i2t": 40 / 95, "t2i": 45 / 95, "interleaved": 10 / 95})
    assert s3 == pytest.approx({"i2t": 37 / 97, "t2i": 35 / 97, "interleaved": 25 / 97})


def test_recipe_overrides_and_errors(tmp_path):
    cfg = load_recipe(RECIPE, ["stages.1.steps=11", "optim.lr=0.5", "data.loader=dali"])
    assert cfg.stage(1).steps == 11 and cfg.optim.lr == 0.5 and cfg.data.loader == "dali"
    assert cfg.optim_for(cfg.stage(0)).lr == 0.5
    with pytest.raises(RecipeError, match="no stage 9"):
        cfg.stage(9)
    with pytest.raises(RecipeError, match="unknown keys"):
        load_recipe(RECIPE, ["optim.learning_rate=1"])
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")


# ----- packing -----
@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    from unimedvl_core.data.phantoms import write_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(out, 16, seed=11)
    return out


def _factory(data_dir, mixture=None, seed=3, data_overrides=(), decode=True):
    cfg = load_recipe(RECIPE, list(data_overrides))
    data = cfg.data
    root, groups = load_registry(REPO / data.registry, str(data_dir))
    config = UniMedVLConfig.from_preset(PRESET)
    specs = build_groups(groups, root, mixture or {"i2t": 0.4, "t2i": 0.4, "interleaved": 0.2}, config)
    tok = load_tokenizer(TOKENIZER)
    return SampleFactory(specs, tok, SpecialTokenIds.from_tokenizer(tok), config, data, seed, 1, decode=decode), data


def _keys(packs):
    return [[s.key for s in pack] for pack in packs]


def test_packs_respect_the_token_budget(phantom_data):
    factory, data = _factory(phantom_data)
    packer = Packer(factory, data, 0, 1, seed=3)
    for _ in range(6):
        pack = packer.next_pack()
        total = sum(s.num_tokens for s in pack)
        assert total <= data.max_num_tokens
        built, vae_images = assemble(pack, factory)
        assert built.length == total
        assert len(vae_images) == sum(1 for s in pack for i in s.items if i.kind == "vae")


def test_resumed_stream_continues_exactly(phantom_data):
    factory, data = _factory(phantom_data)
    straight = Packer(factory, data, 0, 1, seed=3)
    expected = _keys([straight.next_pack() for _ in range(8)])
    first = Packer(factory, data, 0, 1, seed=3)
    head = _keys([first.next_pack() for _ in range(3)])
    state = json.loads(json.dumps(first.state()))  # as written to trainer_state.json
    resumed = Packer(factory, data, 0, 1, seed=3, state=state)
    assert head + _keys([resumed.next_pack() for _ in range(5)]) == expected


def test_shards_are_disjoint(phantom_data):
    factory, data = _factory(phantom_data, mixture={"i2t": 1.0})
    seen = [set(), set()]
    for shard in (0, 1):
        packer = Packer(factory, data, shard, 2, seed=3)
        for _ in range(3):
            seen[shard].update((s.key[0], s.key[2]) for s in packer.next_pack())
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_bad_samples_are_skipped_and_counted(phantom_data, tmp_path):
    import shutil

    data_dir = tmp_path / "broken"
    shutil.copytree(phantom_data, data_dir)
    images = sorted((data_dir / "images").glob("*.png"))
    for path in images[::3]:
        path.unlink()  # missing images
    for path in images[1::3]:
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt images
    factory, data = _factory(data_dir, mixture={"i2t": 1.0})
    packer = Packer(factory, data, 0, 1, seed=3)
    packs = [packer.next_pack() for _ in range(3)]
    assert all(packs)
    skipped = packer.state()["skipped"]
    assert any("missing image" in k for k in skipped) and any("corrupt image" in k for k in skipped)


def test_no_valid_samples_is_a_clear_error(phantom_data, tmp_path):
    import shutil

    data_dir = tmp_path / "empty"
    shutil.copytree(phantom_data, data_dir)
    for path in (data_dir / "images").glob("*.png"):
        path.unlink()
    factory, data = _factory(data_dir, mixture={"i2t": 1.0})
    with pytest.raises(NoValidSamples, match="no valid training samples"):
        Packer(factory, data, 0, 1, seed=3).next_pack()


def test_over_budget_samples_are_skipped(phantom_data):
    factory, data = _factory(phantom_data, mixture={"i2t": 1.0},
                             data_overrides=["data.max_num_tokens_per_sample=40"])
    packer = Packer(factory, data, 0, 1, seed=3)
    pack = packer.next_pack()
    assert all(s.num_tokens <= 40 for s in pack)
    assert any("over the token budget" in k for k in packer.state()["skipped"])


def test_guidance_dropout_keeps_image_positions(phantom_data):
    factory, _ = _factory(phantom_data, mixture={"interleaved": 1.0},
                          data_overrides=["data.vit_cond_dropout_prob=1.0", "data.vae_cond_dropout_prob=1.0",
                                          "data.text_cond_dropout_prob=1.0"])
    group = next(i for i, g in enumerate(factory.groups) if g.name == "phantom_translation")
    sample = factory.make((group, 0, 0))
    assert [i.kind for i in sample.items] == ["skip", "skip", "vae"]  # images kept as positions, text dropped
    pack, _ = assemble([sample], factory)
    assert set(pack.position_ids.tolist()) == {2}  # the target sits after the two dropped images


def test_dali_cpu_decoding_matches_pil(phantom_data):
    pytest.importorskip("nvidia.dali")
    from unimedvl_core.training.dali import DaliDecoder

    factory, _ = _factory(phantom_data, mixture={"interleaved": 1.0}, decode=False)
    reference, _ = _factory(phantom_data, mixture={"interleaved": 1.0})
    sample = factory.make((0, 0, 1))
    tensors = DaliDecoder(device_id=None)([sample.sources[i] for i in sample.sources],
                                          [sample.sizes[i] for i in sample.sources])
    expected = reference.make((0, 0, 1))
    for tensor, i in zip(tensors, sample.sources):
        assert tensor.shape == expected.images[i].shape
        assert (tensor - expected.images[i]).abs().mean() < 0.02  # cubic resampling differs slightly from PIL


_DIGEST = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from test_training_data import _factory
from unimedvl_core.training.stream import Packer, assemble
factory, data = _factory({data!r})
packer = Packer(factory, data, 0, 1, seed=3)
h = hashlib.sha256()
for _ in range(3):
    pack, images = assemble(packer.next_pack(), factory)
    h.update(pack.text_ids.numpy().tobytes()); h.update(pack.vae_timesteps.numpy().tobytes())
print(h.hexdigest())
"""


def test_streams_reproduce_across_processes(phantom_data):
    code = _DIGEST.format(tests=str(Path(__file__).parent), data=str(phantom_data))
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    cfg = load_recipe(recipe)
    assert cfg.stages and all(s.kind == "vae" or s.mixture for s in cfg.stages.values())
    root, groups = load_registry(REPO / cfg.data.registry)
    assert groups and root
