"""Draw doc/figures/distortions.png with matplotlib: drawings of the synthetic sample under the reader's random
distortions of training images (hyper_parameters.train_rotate, train_shear, train_scale, train_shift).

    python doc/figures/make_distortions.py [output.png]          (pip install -e ".[plot]")

The drawings come from models/multitask/maml/data/train (synthetic, not Omniglot), decoded at 28 px as the reader
caches them, and each distortion is the reader's own (omniglot_reader.RecDataset, the code training runs).
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
sys.path.insert(0, MAML_DIR)
import omniglot_reader  # noqa: E402

SAMPLE = os.path.join(MAML_DIR, "data", "train")
# The first drawing of a character from each alphabet of the sample, then of one more character of the first.
CHARACTERS = ["alphabet_01/character01", "alphabet_02/character03", "alphabet_03/character05",
              "alphabet_04/character07", "alphabet_01/character09"]
# Koch et al.'s ranges (2015), about: a turn of up to 10 degrees, shears up to 10, scale 0.8-1.2, 2-pixel shifts.
SETTINGS = {"hyper_parameters.train_rotate": 10, "hyper_parameters.train_shear": 10,
            "hyper_parameters.train_scale": 0.2, "hyper_parameters.train_shift": 2}
COLUMNS = 7  # random distortions per drawing


def distorted_copies(dataset, image, count, seed):
    """`count` random distortions of one uint8 image, drawn by the reader from generators seeded with `seed`."""
    shifts, affine = (np.random.default_rng([seed, stream]) for stream in (1, 2))
    return omniglot_reader.with_copies(image[None], [0], count, dataset.distortion, shifts, affine)[0]


def main(output):
    config = {"hyper_parameters.n_way": 5, "hyper_parameters.k_spt": 1, "hyper_parameters.k_query": 1,
              "runner.tasks_per_epoch": 1, "runner.train_batch_size": 1, **SETTINGS}
    entries = sorted(os.path.join(SAMPLE, name) for name in os.listdir(SAMPLE))
    dataset = omniglot_reader.RecDataset(entries, config, "train")
    fig, axes = plt.subplots(len(CHARACTERS), COLUMNS + 1, dpi=100,
                             figsize=(1.25 * (COLUMNS + 1), 1.35 * len(CHARACTERS) + 0.6))
    for row, character in enumerate(CHARACTERS):
        folder = os.path.join(SAMPLE, character)
        image = omniglot_reader.decode_image(os.path.join(folder, sorted(os.listdir(folder))[0]), dataset.imgsize,
                                             config)
        for col, picture in enumerate([image, *distorted_copies(dataset, image, COLUMNS, row)]):
            ax = axes[row, col]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("#1e8c3c" if col == 0 else "#bbbbbb")
                spine.set_linewidth(2 if col == 0 else 1)
    axes[0, 0].set_title("as drawn", fontsize=10)
    for col in range(1, COLUMNS + 1):
        axes[0, col].set_title(f"draw {col}", fontsize=10)
    fig.suptitle("train_rotate: 10, train_shear: 10, train_scale: 0.2, train_shift: 2 (28 px, synthetic sample)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "doc/figures/distortions.png")
