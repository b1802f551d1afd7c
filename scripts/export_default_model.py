"""Copy a trained checkpoint into the package as the embedded default model: the EMA weights, the VAE,
the configs and the tokenizer (no optimizer or training weights), each file at most 25 MB.

    python scripts/export_default_model.py --source runs/phantom/stage3/final --dest unimedvl_core/default_model
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from unimedvl_core import UniMedVL
from unimedvl_core.io.checkpoint import TOKENIZER_FILES, VAE_FILE, WEIGHT_FILES
from unimedvl_core.modeling.config import LLM_CONFIG_FILE, MODEL_CONFIG_FILE, VIT_CONFIG_FILE

MAX_BYTES = 25 * 1000 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    UniMedVL.from_pretrained(args.source, progress=False)  # refuse to export anything that does not load strictly
    names = [WEIGHT_FILES["ema"], VAE_FILE, LLM_CONFIG_FILE, VIT_CONFIG_FILE, MODEL_CONFIG_FILE, *TOKENIZER_FILES]
    for name in names:
        src = args.source / name
        if not src.is_file():
            continue
        if src.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{src} is {src.stat().st_size / 1e6:.1f} MB, over the 25 MB limit per file")
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.iterdir():
        if old.is_file() and old.name != "README.md":
            old.unlink()
    for name in names:
        if (args.source / name).is_file():
            shutil.copyfile(args.source / name, args.dest / name)
    state = json.loads((args.source / "trainer_state.json").read_text())
    (args.dest / "training.json").write_text(json.dumps({"recipe": state.get("recipe"), "seed": state.get("seed"),
                                                         "final_stage": state.get("stage"),
                                                         "steps_in_final_stage": state.get("step")}, indent=2) + "\n")
    print(f"exported {args.source} to {args.dest}")


if __name__ == "__main__":
    main()
