"""Generate the synthetic Omniglot-like quick-start sample (no real Omniglot inside).

    python datasets/make_synthetic_sample.py [--out models/multitask/maml/data]

Writes OUT/train (4 alphabets x 10 characters) and OUT/test (2 x 10) in
Omniglot's layout <split>/<alphabet>/characterNN/NNNN_DD.png, 20 drawings per
character, 105x105 1-bit PNG. Deterministic: the output is byte-identical on
every run, which tests/test_synthetic_sample.py checks against the committed copy.
"""
import argparse
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_glyphs import png1bit, strokes  # noqa: E402

SEED = 20260
DRAWINGS = 20
# split -> alphabets, characters per alphabet; train and test classes are disjoint
LAYOUT = {"train": (4, 10), "test": (2, 10)}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           os.pardir, "models", "multitask", "maml", "data")


def classes():
    """(split, alphabet folder, character folder, class id, strokes) for every class."""
    class_id, alphabet_no = 0, 0
    for split, (n_alphabets, n_chars) in LAYOUT.items():
        for _ in range(n_alphabets):
            alphabet_no += 1
            style = strokes.alphabet_style(np.random.default_rng([SEED, 0, alphabet_no]))
            for c in range(1, n_chars + 1):
                class_id += 1
                glyph = strokes.character(np.random.default_rng([SEED, 1, class_id]), style)
                yield split, f"alphabet_{alphabet_no:02d}", f"character{c:02d}", class_id, glyph


def write_split(out, split, items):
    """Build OUT/.split.tmp and swap it in, so OUT/split is never half-written."""
    final, tmp = os.path.join(out, split), os.path.join(out, f".{split}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for _, alphabet, char, class_id, glyph in items:
        folder = os.path.join(tmp, alphabet, char)
        os.makedirs(folder)
        for drawer in range(1, DRAWINGS + 1):
            rng = np.random.default_rng([SEED, 2, class_id, drawer])
            with open(os.path.join(folder, f"{class_id:04d}_{drawer:02d}.png"), "wb") as f:
                f.write(png1bit.encode(strokes.drawing(rng, glyph)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="default: models/multitask/maml/data")
    out = os.path.abspath(parser.parse_args(argv).out)
    os.makedirs(out, exist_ok=True)
    every = list(classes())
    for split in LAYOUT:
        write_split(out, split, [item for item in every if item[0] == split])
    print(f"wrote {len(every)} classes x {DRAWINGS} drawings to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
