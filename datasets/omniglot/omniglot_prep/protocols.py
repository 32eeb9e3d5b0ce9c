"""Which Omniglot characters go to which split, one small function per protocol.

Each protocol maps the sorted character lists of the two archives to
{split: [(alphabet, character), ...]}. The shuffled protocols SORT the merged
(alphabet, character) list before shuffling: PaddleRec shuffled the raw
os.listdir order, which depends on the filesystem, so its split was not
reproducible across machines; sorting first makes ours the same everywhere.
"""
import random
from collections import Counter, namedtuple

# sizes: {split: number of characters}; folder names are derived from prefix.
Protocol = namedtuple("Protocol", "name prefix sizes assign")
SEED = 1
# Lake's validation split: this many whole background alphabets, each with at least 20 characters so that
# 20-way within-alphabet validation tasks exist (like the test's, and Lake et al.'s one-shot trials).
LAKE_VALID_ALPHABETS = 5
LAKE_VALID_MIN_CHARACTERS = 20


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


def lake_valid_alphabets(background):
    """The background alphabets held out for validation: a seeded draw over the sorted names of those with
    enough characters, so the choice is the same everywhere and favours no kind of script."""
    sizes = Counter(alphabet for alphabet, _ in background)
    eligible = sorted(alphabet for alphabet, n in sizes.items() if n >= LAKE_VALID_MIN_CHARACTERS)
    return sorted(random.Random(SEED).sample(eligible, LAKE_VALID_ALPHABETS))


def lake(background, evaluation):
    """Lake et al.: background alphabets train, evaluation alphabets test; a few whole background alphabets
    validate, so a checkpoint is chosen without looking at the evaluation alphabets."""
    held_out = set(lake_valid_alphabets(background))
    return {"train": sorted(c for c in background if c[0] not in held_out),
            "valid": sorted(c for c in background if c[0] in held_out),
            "test": sorted(evaluation)}


PROTOCOLS = {
    "paddlerec": Protocol("paddlerec", "omniglot", {"train": 973, "valid": 325, "test": 325}, paddlerec),
    "vinyals": Protocol("vinyals", "omniglot_vinyals", {"train": 1100, "valid": 100, "test": 423}, vinyals),
    # valid: Arcadian 26, Asomtavruli (Georgian) 40, Korean 40, Syriac (Estrangelo) 23, Tifinagh 55 characters.
    # A folder with another count (the 964 characters of all background alphabets, before valid existed) is
    # incomplete, so prepare.py writes it again.
    "lake": Protocol("lake", "omniglot_lake", {"train": 780, "valid": 184, "test": 659}, lake),
}


def folder_name(protocol, split):
    return f"{protocol.prefix}_{split}"
