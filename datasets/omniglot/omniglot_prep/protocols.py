"""Which Omniglot characters go to which split, one small function per protocol.

Each protocol maps the sorted character lists of the two archives to
{split: [(alphabet, character), ...]}. The shuffled protocols SORT the merged
(alphabet, character) list before shuffling: PaddleRec shuffled the raw
os.listdir order, which depends on the filesystem, so its split was not
reproducible across machines; sorting first makes ours the same everywhere.
"""
import random
from collections import namedtuple

# sizes: {split: number of characters}; folder names are derived from prefix.
Protocol = namedtuple("Protocol", "name prefix sizes assign")
SEED = 1


def _shuffled(background, evaluation):
    merged = sorted(background + evaluation)  # alphabet names are distinct
    random.Random(SEED).shuffle(merged)  # == PaddleRec's random.seed(1); random.shuffle
    return merged


def _cut(chars, sizes):
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = chars[start:start + size]
        start += size
    return out


def paddlerec(background, evaluation):
    """PaddleRec: all 1623 characters shuffled, 973 / 325 / 325."""
    return _cut(_shuffled(background, evaluation), PROTOCOLS["paddlerec"].sizes)


def vinyals(background, evaluation):
    """Vinyals et al. / MAML paper: shuffled, 1100 / 100 / 423; the reader adds rotations."""
    return _cut(_shuffled(background, evaluation), PROTOCOLS["vinyals"].sizes)


def lake(background, evaluation):
    """Lake et al.: background alphabets train, evaluation alphabets test (no valid split)."""
    return {"train": sorted(background), "test": sorted(evaluation)}


PROTOCOLS = {
    "paddlerec": Protocol("paddlerec", "omniglot", {"train": 973, "valid": 325, "test": 325}, paddlerec),
    "vinyals": Protocol("vinyals", "omniglot_vinyals", {"train": 1100, "valid": 100, "test": 423}, vinyals),
    "lake": Protocol("lake", "omniglot_lake", {"train": 964, "test": 659}, lake),
}


def folder_name(protocol, split):
    return f"{protocol.prefix}_{split}"
