"""The committed quick-start sample: reproducible bit for bit, well formed, split cleanly."""
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "models", "multitask", "maml", "data")
SCRIPT = os.path.join(REPO_ROOT, "datasets", "make_synthetic_sample.py")


def png_files(root):
    """{relative path: bytes} of every PNG under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".png"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def committed():
    return png_files(SAMPLE)


def test_regeneration_is_byte_identical(committed, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    regenerated = png_files(tmp_path)
    assert sorted(regenerated) == sorted(committed)
    changed = [path for path in committed if committed[path] != regenerated[path]]
    assert not changed, f"{len(changed)} files differ, e.g. {changed[:3]}"


def classes_of(committed, split):
    return Counter(os.path.dirname(p) for p in committed if p.startswith(split + os.sep))


def test_counts_and_layout(committed):
    train, test = classes_of(committed, "train"), classes_of(committed, "test")
    assert len(train) == 40 and len(test) == 20
    assert set(train.values()) == set(test.values()) == {20}
    assert len({p.split(os.sep)[1] for p in train}) == 4
    assert len({p.split(os.sep)[1] for p in test}) == 2
    for path in committed:  # <split>/<alphabet>/characterNN/NNNN_DD.png
        split, alphabet, char, name = path.split(os.sep)
        assert alphabet.startswith("alphabet_") and char.startswith("character")
        assert len(name) == len("0001_01.png") and name[4] == "_"


def test_train_and_test_classes_are_disjoint(committed):
    ids = {split: {name[:4] for p in committed if p.startswith(split + os.sep)
                   for name in [os.path.basename(p)]} for split in ("train", "test")}
    assert len(ids["train"]) == 40 and len(ids["test"]) == 20
    assert not ids["train"] & ids["test"]
    alphabets = {split: {p.split(os.sep)[1] for p in committed if p.startswith(split + os.sep)}
                 for split in ("train", "test")}
    assert not alphabets["train"] & alphabets["test"]
    by_split = {split: {b for p, b in committed.items() if p.startswith(split + os.sep)}
                for split in ("train", "test")}
    assert not by_split["train"] & by_split["test"]  # no image shared


def test_images_are_omniglot_like_and_small(committed):
    assert sum(len(b) for b in committed.values()) < 1_000_000  # bytes of PNG, far under 2 MB
    path = os.path.join(SAMPLE, sorted(committed)[0])
    with Image.open(path) as img:
        assert (img.mode, img.size) == ("1", (105, 105))
        ink = 1.0 - np.asarray(img, dtype=np.float32).mean()
    assert 0.01 < ink < 0.2  # black strokes on a mostly white page


def test_classes_are_distinguishable(committed):
    """Nearest class mean over drawings 1-10 labels drawings 11-20 far above chance."""
    feats, labels, drawer = [], [], []
    for path in sorted(committed):
        with Image.open(os.path.join(SAMPLE, path)) as img:
            small = img.convert("L").resize((28, 28), Image.LANCZOS).filter(ImageFilter.GaussianBlur(1.5))
        feats.append(255.0 - np.asarray(small, dtype=np.float32).ravel())
        labels.append(os.path.dirname(path))
        drawer.append(int(os.path.basename(path)[5:7]))
    feats, labels, drawer = np.stack(feats), np.array(labels), np.array(drawer)
    names = sorted(set(labels))
    means = np.stack([feats[(labels == n) & (drawer <= 10)].mean(axis=0) for n in names])
    held = drawer > 10
    dist = ((feats[held][:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = (np.array(names)[dist.argmin(axis=1)] == labels[held]).mean()
    assert accuracy > 0.4  # chance is 1/60
