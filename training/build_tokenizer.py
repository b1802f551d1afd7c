"""Train the byte-level BPE tokenizer of a small model on text files (one sample per line).

    python training/build_tokenizer.py --out unimedvl_core/default_model --vocab-size 1024 corpus.txt ...

With no corpus files, the prompt templates of ``unimedvl_core.prompts`` and a list of common radiology
terms are used, enough for a tokenizer that covers the task prompts.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from unimedvl_core import prompts
from unimedvl_core.tokenizer import train_tokenizer

TERMS = """axial coronal sagittal chest abdomen pelvis brain head neck spine knee liver lung lungs kidney heart
lesion lesions nodule nodules mass masses tumor effusion pneumothorax consolidation opacity fracture edema
hemorrhage infarct left right upper lower middle lobe anterior posterior medial lateral central peripheral
small large round oval irregular bright dark hyperintense hypointense hyperdense hypodense enhancing
CT MRI MR T1 T2 FLAIR X-ray radiograph ultrasound histology pathology H&E IHC stain staining endoscopy OCT
fundus dermoscopy normal abnormal yes no one two three four five six seven eight nine ten zero count
findings impression there is are no evidence of with without and the a an in on at of to is image shows""".split()


def default_corpus() -> list[str]:
    texts = [v for _, v in inspect.getmembers(prompts) if isinstance(v, str) and not v.startswith("__")]
    return texts + [" ".join(TERMS[i:i + 12]) for i in range(0, len(TERMS), 6)] + TERMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="*", type=Path, help="text files, one sample per line")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    lines = [line for f in args.corpus for line in f.read_text().splitlines() if line.strip()] or default_corpus()
    tok = train_tokenizer(lines, args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {len(tok)} tokens written to {args.out}")


if __name__ == "__main__":
    main()
