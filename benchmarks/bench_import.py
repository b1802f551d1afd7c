"""Import cost: how long ``from unimedvl_core import UniMedVL`` and ``unimedvl --help`` take in a fresh process.

    python benchmarks/bench_import.py [--runs 7]

Every figure is the median wall time of ``--runs`` fresh interpreter processes, run interleaved so that load
on the machine affects each figure alike:

* ``import_torch_s``: ``import torch`` alone;
* ``import_unimedvl_s``: ``import torch`` then ``from unimedvl_core import UniMedVL`` with the name resolved
  (the package imports its names on first use);
* ``unimedvl_over_torch_s``: the difference of the two, the cost of the package itself;
* ``cli_help_s``: ``unimedvl --help``.

``heavy_modules`` lists which of diffusers, transformers, accelerate, highdicom and scipy the light import
loaded (they should load only when a model is built). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TORCH = "import torch"
UNIMEDVL = "import torch; from unimedvl_core import UniMedVL; UniMedVL"
HEAVY = ("diffusers", "transformers", "accelerate", "highdicom", "scipy")


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("unimedvl")
    if script.is_file():
        return [str(script), "--help"]
    return [sys.executable, "-m", "unimedvl_core.surfaces.cli", "--help"]


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _heavy_modules() -> list[str]:
    code = f"{UNIMEDVL}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return out.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per figure (median reported)")
    args = parser.parse_args()
    commands = {"import_torch_s": [sys.executable, "-c", TORCH], "import_unimedvl_s": [sys.executable, "-c", UNIMEDVL],
                "cli_help_s": _cli_command()}
    for command in commands.values():  # warm the file cache once
        _wall(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            times[name].append(_wall(command))
    med = {name: round(statistics.median(values), 3) for name, values in times.items()}
    result = {
        "import_torch_s": med["import_torch_s"],
        "import_unimedvl_s": med["import_unimedvl_s"],
        "unimedvl_over_torch_s": round(med["import_unimedvl_s"] - med["import_torch_s"], 3),
        "cli_help_s": med["cli_help_s"],
        "cli_help_over_torch_s": round(med["cli_help_s"] - med["import_torch_s"], 3),
        "heavy_modules": _heavy_modules(),
        "runs": args.runs,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
