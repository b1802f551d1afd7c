"""From dataset rows to packed training sequences, sharded, reproducible and resumable.

- Every dataset group is read in a per-epoch permutation (seeded by the run seed, the group and the
  epoch) and split across ranks and data workers; a group's position is (epoch, cursor).
- Each sample's random choices (caption choice, guidance dropout, flow time) come from a generator seeded
  by (seed, stage, group, epoch, row): the same sample is the same in every process and after a resume.
- Groups are drawn with probability proportional to their weight; samples are packed up to a token budget
  (docs/training.md), a sample that does not fit waits in a buffer for the next pack.
- The packer's state (positions, group-choice generator, buffered sample keys, counters) travels with
  every pack, so a checkpoint saves exactly where the data stream stood.
- Bad samples (missing or corrupt image, malformed record, over the token budget) are skipped and counted;
  a group that yields no valid sample in a whole epoch is dropped with a warning, and a run left with no
  valid samples stops with an error.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..modeling.config import UniMedVLConfig
from ..modeling.embeddings import grid_position_ids
from ..modeling.flow_matching import sample_flow_time
from ..modeling.layout import image_block_len, text_block_len
from ..modeling.packing import Pack, PackBuilder
from ..modeling.preprocessing import ResizeRule, resize_to_rule, to_model_tensor, to_rgb
from ..modeling.tokenizer import SpecialTokenIds, load_tokenizer
from .config import DataConfig
from .datasets import PlanItem, RecordError, open_rows, record_plan

__all__ = ["GroupSpec", "build_groups", "SampleFactory", "Packer", "PackStream", "TrainingPack", "make_loader",
           "NoValidSamples", "DEFAULT_RULES"]

log = logging.getLogger(__name__)

# Released training resize rules per format (docs/training.md): (vit, vae).
DEFAULT_RULES = {
    "SftJSONLIterableDataset_Ver1": (ResizeRule(980, 378, 14, 2_007_040), ResizeRule(1024, 512, 16)),
    "T2IIterableDataset_Ver1": (ResizeRule(980, 378, 14, 2_007_040), ResizeRule(1024, 512, 16)),
    "t2i_pretrain": (ResizeRule(980, 378, 14, 2_007_040), ResizeRule(1024, 512, 16)),
    "MedicalImageEditingIterableDataset_ver1": (ResizeRule(518, 224, 14), ResizeRule(512, 224, 16)),
    "CounterfactualMedicalIterableDataset_ver1": (ResizeRule(518, 224, 14), ResizeRule(512, 224, 16)),
}


class NoValidSamples(RuntimeError):
    """No dataset group produced a single valid sample."""


def _reason(err: RecordError) -> str:
    text = str(err)
    for reason in ("missing image", "corrupt image", "image too large"):
        if text.startswith(reason):
            return reason
    return "malformed record"


@dataclass
class GroupSpec:
    name: str
    fmt: str
    rows: object
    weight: float
    image_dir: Path
    vit_rule: ResizeRule
    vae_rule: ResizeRule
    cfg_condition_images: bool = False


def _rule(value, model_config: UniMedVLConfig, default: ResizeRule) -> ResizeRule:
    if value is None:
        return default
    if isinstance(value, str):
        if not hasattr(model_config.transforms, value):
            raise ValueError(f"unknown transform name {value!r}; use vqa_vit, gen_vae, gen_vit or explicit args")
        return getattr(model_config.transforms, value)
    return ResizeRule(**value)


def build_groups(groups: dict[str, dict], data_dir: Path, mixture: dict[str, float],
                 model_config: UniMedVLConfig) -> list[GroupSpec]:
    """Groups of the categories the stage samples, with weights = category share x group share."""
    by_category: dict[str, list[tuple[str, dict]]] = {}
    for name, group in groups.items():
        by_category.setdefault(group["category"], []).append((name, group))
    specs = []
    for category, share in mixture.items():
        members = by_category.get(category, [])
        if not members:
            raise ValueError(f"the stage samples category {category!r} but the registry has no group of it")
        total = sum(float(g.get("weight", 1.0)) for _, g in members)
        for name, group in members:
            vit_default, vae_default = DEFAULT_RULES[group["format"]]
            specs.append(GroupSpec(
                name=name, fmt=group["format"], rows=open_rows(group, data_dir),
                weight=share * float(group.get("weight", 1.0)) / total,
                image_dir=data_dir / group.get("image_dir", "images"),
                vit_rule=_rule(group.get("vit_transform"), model_config, vit_default),
                vae_rule=_rule(group.get("vae_transform"), model_config, vae_default),
                cfg_condition_images=bool(group.get("cfg_condition_images", False)),
            ))
    return specs


@dataclass
class Sample:
    key: tuple[int, int, int]                  # (group, epoch, row)
    items: list[PlanItem]
    images: list                               # per item index: image tensor (3, H, W) or None
    sizes: dict[int, tuple[int, int]]          # item index -> (width, height) after its resize rule
    sources: dict[int, object]                 # item index -> ImageSource (decoded later by DALI)
    timesteps: dict[int, float]
    num_tokens: int


class SampleFactory:
    """Turns a (group, epoch, row) key into a sample ready for packing."""

    def __init__(self, groups: list[GroupSpec], tokenizer, special: SpecialTokenIds, model_config: UniMedVLConfig,
                 data: DataConfig, seed: int, stage: int, decode: bool = True):
        self.groups, self.tokenizer, self.special = groups, tokenizer, special
        self.config, self.data, self.seed, self.stage = model_config, data, seed, stage
        self.decode = decode  # False: only sizes; pixels are decoded per pack (DALI)

    def rng(self, key: tuple[int, int, int]) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stage, *key])

    def make(self, key: tuple[int, int, int]) -> Sample:
        g, _epoch, row = key
        spec = self.groups[g]
        rng = self.rng(key)
        record = spec.rows[row]
        items, sources = record_plan(spec.fmt, record, spec.image_dir, rng, spec.cfg_condition_images)
        header_sizes = [source.header_size() for source in sources]  # a broken image rejects the whole record
        d = self.data
        kept: list[PlanItem] = []
        for item in items:  # guidance dropout (docs/training.md): dropped images still take one position
            p = {"text": d.text_cond_dropout_prob, "vit": d.vit_cond_dropout_prob,
                 "vae": d.vae_cond_dropout_prob}[item.kind]
            if item.cfg and not item.loss and rng.random() < p:
                if item.kind != "text":
                    kept.append(PlanItem("skip"))
                continue
            kept.append(item)
        if not any(item.loss for item in kept):
            raise RecordError("no supervised item left")
        images, sizes, used_sources, timesteps = [None] * len(kept), {}, {}, {}
        tokens = 0
        cache: dict[int, object] = {}
        for i, item in enumerate(kept):
            if item.kind == "text":
                item.ids = self.tokenizer.encode(item.text, add_special_tokens=False)
                tokens += text_block_len(len(item.ids))
            elif item.kind in ("vit", "vae"):
                source = sources[item.image]
                rule = spec.vit_rule if item.kind == "vit" else spec.vae_rule
                width, height = rule.target_size(*header_sizes[item.image])
                sizes[i] = (width, height)
                stride = self.config.vit_patch_size if item.kind == "vit" else self.config.latent_downsample
                tokens += image_block_len((width // stride) * (height // stride))
                if self.decode:
                    if item.image not in cache:
                        cache[item.image] = to_rgb(source.open())
                    images[i] = to_model_tensor(resize_to_rule(cache[item.image], rule))
                else:
                    used_sources[i] = source
                if item.kind == "vae" and item.loss:
                    timesteps[i] = sample_flow_time(rng, d.timestep_shift)
            else:
                tokens += 0  # a dropped image takes a position, no tokens
        return Sample(key, kept, images, sizes, used_sources, timesteps, tokens)


@dataclass
class TrainingPack:
    pack: Pack
    vae_images: list[torch.Tensor]
    noise_seed: int
    num_samples: int
    state: dict = field(default_factory=dict)


class Packer:
    """The resumable stream of packs of one data shard."""

    def __init__(self, factory: SampleFactory, data: DataConfig, shard: int, num_shards: int, seed: int,
                 state: dict | None = None):
        if data.max_num_tokens_per_sample > data.max_num_tokens:
            raise ValueError("max_num_tokens_per_sample must not exceed max_num_tokens")
        self.factory, self.data, self.shard, self.num_shards, self.seed = factory, data, shard, num_shards, seed
        groups = factory.groups
        self.weights = np.array([g.weight for g in groups], dtype=np.float64)
        self.positions = [[0, 0] for _ in groups]  # (epoch, cursor)
        self.choice = np.random.default_rng([seed, factory.stage, shard, 7919])
        self.buffer: list[Sample] = []
        self.packs = 0
        self.skipped: Counter = Counter()
        self.dead: set[int] = set()
        self._valid_in_epoch = [False] * len(groups)
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        if state:
            self.load_state(state)

    # ----- state -----
    def state(self) -> dict:
        return {"positions": copy.deepcopy(self.positions), "choice": self.choice.bit_generator.state,
                "buffer": [list(s.key) for s in self.buffer], "packs": self.packs, "skipped": dict(self.skipped),
                "dead": sorted(self.dead), "valid_in_epoch": list(self._valid_in_epoch), "shard": self.shard,
                "num_shards": self.num_shards}

    def load_state(self, state: dict) -> None:
        if state.get("num_shards") not in (None, self.num_shards):
            raise ValueError(f"data state was saved with {state['num_shards']} shards; this run has "
                             f"{self.num_shards} (resume with the same number of processes and workers)")
        self.positions = [list(p) for p in state["positions"]]
        self.choice.bit_generator.state = state["choice"]
        self.packs = int(state["packs"])
        self.skipped = Counter(state.get("skipped", {}))
        self.dead = set(state.get("dead", []))
        # Without it, a resume would drop every group whose epoch ends before it yields again.
        self._valid_in_epoch = [bool(v) for v in state.get("valid_in_epoch", [True] * len(self.positions))]
        self.buffer = [self.factory.make(tuple(key)) for key in state["buffer"]]

    # ----- rows -----
    def _order(self, g: int, epoch: int) -> np.ndarray:
        if (g, epoch) not in self._orders:
            n = len(self.factory.groups[g].rows)
            order = np.random.default_rng([self.seed, g, epoch]).permutation(n) if self.data.shuffle else np.arange(n)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != g}
            self._orders[(g, epoch)] = order[self.shard::self.num_shards]
        return self._orders[(g, epoch)]

    def _next_key(self, g: int) -> tuple[int, int, int] | None:
        epoch, cursor = self.positions[g]
        order = self._order(g, epoch)
        if cursor >= len(order):
            if len(order) == 0 or not self._valid_in_epoch[g]:
                self.dead.add(g)
                log.warning("dataset group %s yielded no valid sample in a whole epoch; it is dropped",
                            self.factory.groups[g].name)
                return None
            self.positions[g] = [epoch + 1, 0]
            self._valid_in_epoch[g] = False
            return self._next_key(g)
        self.positions[g] = [epoch, cursor + 1]
        return g, epoch, int(order[cursor])

    def _draw(self) -> Sample:
        while True:
            live = [g for g in range(len(self.weights)) if g not in self.dead]
            if not live:
                raise NoValidSamples("no valid training samples: every dataset group was empty or unusable "
                                     f"(skipped: {dict(self.skipped)})")
            w = self.weights[live] / self.weights[live].sum()
            g = live[int(self.choice.choice(len(live), p=w))]
            key = self._next_key(g)
            if key is None:
                continue
            try:
                sample = self.factory.make(key)
            except RecordError as err:
                self._skip(f"{self.factory.groups[g].name}: {_reason(err)}", err)
                continue
            if sample.num_tokens > self.data.max_num_tokens_per_sample:
                self._skip(f"{self.factory.groups[g].name}: over the token budget",
                           f"{sample.num_tokens} tokens > {self.data.max_num_tokens_per_sample}")
                continue
            self._valid_in_epoch[g] = True
            return sample

    def _skip(self, reason: str, detail) -> None:
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n == 1 or n % 100 == 0:
            log.warning("skipped %d sample(s) [%s]; latest: %s", n, reason, detail)

    # ----- packs -----
    def next_pack(self) -> list[Sample]:
        pack, tokens = [], 0
        while tokens < self.data.expected_num_tokens:
            fit = next((s for s in self.buffer if tokens + s.num_tokens <= self.data.max_num_tokens), None)
            if fit is not None:
                self.buffer.remove(fit)
                sample = fit
            else:
                sample = self._draw()
                if tokens + sample.num_tokens > self.data.max_num_tokens:
                    self.buffer.append(sample)
                    if len(self.buffer) > self.data.max_buffer_size:
                        log.warning("packing buffer over %d samples", self.data.max_buffer_size)
                    break
            pack.append(sample)
            tokens += sample.num_tokens
        self.packs += 1
        return pack


def assemble(samples: list[Sample], factory: SampleFactory, decode_batch=None) -> tuple[Pack, list[torch.Tensor]]:
    """Lay the samples out in one sequence; VAE images stay pixels for the trainer to encode."""
    if decode_batch is not None:
        pending = [(s, i) for s in samples for i in s.sources]
        tensors = decode_batch([s.sources[i] for s, i in pending], [s.sizes[i] for s, i in pending])
        for (s, i), tensor in zip(pending, tensors):
            s.images[i] = tensor
    config = factory.config
    builder = PackBuilder(factory.special)
    vae_images = []
    for sample in samples:
        builder.start_sample()
        for i, item in enumerate(sample.items):
            if item.kind == "text":
                builder.add_text(item.ids, loss=item.loss)
            elif item.kind == "skip":
                builder.skip_image()
            elif item.kind == "vit":
                builder.add_vit_image(sample.images[i], config.vit_patch_size)
            else:
                image = sample.images[i]
                d = config.latent_downsample
                h, w = image.shape[1] // d, image.shape[2] // d
                builder.add_vae_image(None, h, w, grid_position_ids(h, w, config.max_latent_size),
                                      timestep=sample.timesteps.get(i, 0.0))
                vae_images.append(image)
    return builder.build(), vae_images


class PackStream(IterableDataset):
    """Yields ``TrainingPack`` objects of this rank's shard; with one DataLoader worker per rank."""

    def __init__(self, groups_args: tuple, tokenizer_dir: str, model_config: UniMedVLConfig, data: DataConfig,
                 seed: int, stage: int, rank: int, world: int, state: dict | None):
        self.groups_args, self.tokenizer_dir, self.model_config = groups_args, tokenizer_dir, model_config
        self.data, self.seed, self.stage, self.rank, self.world, self.state = data, seed, stage, rank, world, state

    def _factory(self, decode: bool) -> SampleFactory:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokenizer = load_tokenizer(self.tokenizer_dir)
        groups = build_groups(*self.groups_args, self.model_config)
        return SampleFactory(groups, tokenizer, SpecialTokenIds.from_tokenizer(tokenizer), self.model_config,
                             self.data, self.seed, self.stage, decode=decode)

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("use at most one data worker per rank (packing order must be reproducible)")
        use_dali = self.data.loader == "dali"
        factory = self._factory(decode=not use_dali)
        decode_batch = None
        if use_dali:
            from .dali import DaliDecoder

            decode_batch = DaliDecoder(device_id=None if info is not None or not torch.cuda.is_available()
                                       else torch.cuda.current_device())
        packer = Packer(factory, self.data, self.rank, self.world, self.seed, self.state)
        while True:
            samples = packer.next_pack()
            pack, vae_images = assemble(samples, factory, decode_batch)
            seed = int(np.random.default_rng([self.seed, self.stage, self.rank, packer.packs]).integers(2**62))
            yield TrainingPack(pack, vae_images, seed, len(samples), packer.state())


def make_loader(stream: PackStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      prefetch_factor=2 if num_workers else None, persistent_workers=False)
