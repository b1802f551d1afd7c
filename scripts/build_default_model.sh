#!/usr/bin/env bash
# Reproduce the embedded default model: phantom data, the whole curriculum, export, and its scores on
# phantoms generated afresh (a different seed from the training data).
#   bash scripts/build_default_model.sh            (about 3 hours on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/phantoms}
run=${RUN:-runs/phantom}
n=${N_PHANTOMS:-4000}
unimedvl phantoms --out "$data/train" --n "$n" --seed 1
unimedvl train --config configs/train/phantom.yaml --stage all --set "run_dir=$run" --set "data.data_dir=$data/train"
python scripts/export_default_model.py --source "$run/stage3/final" --dest unimedvl_core/default_model
unimedvl phantom-eval --ckpt unimedvl_core/default_model --out unimedvl_core/default_model/scores.json
