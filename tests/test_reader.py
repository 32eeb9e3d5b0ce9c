"""models/multitask/maml/omniglot_reader.py: episodes, reproducibility, sharding,
rotations, decode cache and user errors, on the synthetic sample and tiny trees."""
import os
import contextlib
import shutil
import signal
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
sys.path.insert(0, MAML_DIR)
import omniglot_reader  # noqa: E402
from omniglot_reader import RecDataset  # noqa: E402


def config(**overrides):
    """Flat dotted-key dict like the trainer's Config; '__' stands for '.'."""
    values = {"hyper_parameters.n_way": 5, "hyper_parameters.k_spt": 1,
              "hyper_parameters.k_query": 15, "hyper_parameters.imgsize": 28,
              "runner.tasks_per_epoch": 24, "runner.train_batch_size": 8,
              "runner.infer_tasks": 20, "runner.infer_batch_size": 8}
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return values


def entries(data_dir):
    """What the trainer passes: sorted absolute paths of the data dir's entries."""
    return sorted(os.path.join(data_dir, n) for n in os.listdir(data_dir))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A private copy of the committed sample, so caches land in tmp, not the repo."""
    root = tmp_path_factory.mktemp("sample")
    for split in ("train", "test"):
        shutil.copytree(os.path.join(MAML_DIR, "data", split), root / split)
    return root


@pytest.fixture(scope="module")
def train(sample):
    return RecDataset(entries(sample / "train"), config())


def make_tree(root, layout, size=105, seed=0):
    """layout {group: {character: n_images}}; every image has distinct random pixels."""
    rng = np.random.default_rng(seed)
    for group, chars in layout.items():
        for char, n in chars.items():
            folder = root / group / char
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = (rng.random((size, size)) < 0.5).astype(np.uint8) * 255
                Image.fromarray(pixels).convert("1").save(folder / f"{k:04d}.png")
    return root


# ----- shapes, labels, disjointness -----
def test_task_shapes_and_dtypes(train):
    x_spt, y_spt, x_qry, y_qry = next(iter(train))
    assert x_spt.shape == (5, 1, 28, 28) and x_spt.dtype == np.float32
    assert y_spt.shape == (5,) and y_spt.dtype == np.int64
    assert x_qry.shape == (75, 1, 28, 28) and x_qry.dtype == np.float32
    assert y_qry.shape == (75,) and y_qry.dtype == np.int64
    assert x_spt.min() >= -1.0 and x_spt.max() <= 1.0
    assert x_spt.min() == -1.0 and x_spt.max() == 1.0  # ink and paper both present


def test_labels_balanced_and_consistent(train):
    for i in range(10):
        ep = train.episode(0, i)
        assert np.bincount(ep.y_spt, minlength=5).tolist() == [1] * 5
        assert np.bincount(ep.y_qry, minlength=5).tolist() == [15] * 5
        assert len(set(ep.spt_classes.tolist())) == 5  # classes without replacement
        # one label per class, the same in support and query
        mapping = dict(zip(ep.spt_classes.tolist(), ep.y_spt.tolist()))
        assert len(set(mapping.values())) == 5
        assert all(mapping[c] == y for c, y in zip(ep.qry_classes.tolist(), ep.y_qry.tolist()))


def test_labels_and_order_are_shuffled(train):
    eps = [train.episode(0, i) for i in range(20)]
    assert any(ep.y_qry.tolist() != sorted(ep.y_qry.tolist()) for ep in eps)
    # the label of the lowest class id varies: labels are not tied to class order
    assert len({int(ep.y_spt[np.argmin(ep.spt_classes)]) for ep in eps}) > 1


def test_support_and_query_are_disjoint_draws(train):
    for i in range(20):
        ep = train.episode(0, i)
        assert not set(ep.spt_images.tolist()) & set(ep.qry_images.tolist())
        assert len(set(ep.qry_images.tolist())) == len(ep.qry_images)
        for images, classes in ((ep.spt_images, ep.spt_classes), (ep.qry_images, ep.qry_classes)):
            for image, cls in zip(images, classes):  # each image is from its class's folder
                assert train.image_paths[image].startswith(train.class_dirs[cls] + os.sep)


def test_pixels_are_the_drawn_images(train):
    ep = train.episode(0, 3)
    x_spt, y_spt, x_qry, _ = train.task(0, 3)
    for row, image in zip(x_qry, ep.qry_images):
        with Image.open(train.image_paths[image]) as img:
            ref = np.asarray(img.convert("L").resize((28, 28), omniglot_reader.RESAMPLE), dtype=np.float32)
        np.testing.assert_allclose(row[0], ref / 255.0 * 2.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y_spt, ep.y_spt)


def test_imgsize_is_honoured(sample):
    ds = RecDataset(entries(sample / "test"), config(hyper_parameters__imgsize=40), mode="infer")
    assert ds.task(0, 0)[0].shape == (5, 1, 40, 40)


# ----- reproducibility and the task stream -----
def test_same_seed_same_tasks_other_epoch_other_tasks(sample, train):
    again = RecDataset(entries(sample / "train"), config())
    for i in range(5):
        for a, b in zip(train.task(0, i), again.task(0, i)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(train.episode(0, 0).qry_images, train.episode(1, 0).qry_images)
    other_seed = RecDataset(entries(sample / "train"), config(runner__seed=7))
    assert not np.array_equal(train.episode(0, 0).qry_images, other_seed.episode(0, 0).qry_images)


def test_iteration_follows_task_numbers_and_epoch(sample):
    ds = RecDataset(entries(sample / "train"), config())
    items = list(ds)
    assert len(items) == 24 == ds.num_tasks and ds.num_batches == 3
    np.testing.assert_array_equal(items[7][3], ds.task(0, 7)[3])
    ds.set_epoch(2)
    np.testing.assert_array_equal(next(iter(ds))[1], ds.task(2, 0)[1])


def test_train_and_infer_streams_differ(sample):
    cfg = config()
    a = RecDataset(entries(sample / "test"), cfg, mode="train").episode(0, 0)
    b = RecDataset(entries(sample / "test"), cfg, mode="infer").episode(0, 0)
    assert not np.array_equal(a.qry_images, b.qry_images)


def test_defaults(sample):
    cfg = config(runner__tasks_per_epoch=None, runner__infer_tasks=None, runner__train_batch_size=None,
                 runner__infer_batch_size=None, hyper_parameters__imgsize=None)
    ds = RecDataset(entries(sample / "train"), cfg)
    assert (ds.tasks_per_epoch, ds.batch_size, ds.imgsize, ds.seed, ds.rotations) == (3200, 32, 28, 2026, False)
    assert ds.num_batches == 100
    assert RecDataset(entries(sample / "train"), cfg, mode="infer").tasks_per_epoch == 1000


def test_without_a_mode_the_folder_picks_it(sample):
    # PaddleRec's tools build RecDataset(file_list, config=config) for training and inference alike.
    cfg = config(config_abs_dir=str(sample), runner__train_data_dir="train", runner__test_data_dir="test")
    assert RecDataset(entries(sample / "test"), config=cfg).mode == "infer"
    assert RecDataset(entries(sample / "train"), config=cfg).mode == "train"
    same = dict(cfg, **{"runner.test_data_dir": "./train"})  # one folder for both: it is training data
    assert RecDataset(entries(sample / "train"), config=same).mode == "train"


# ----- sharding -----
def labels_of(ds):
    return [task[3].tolist() for task in ds]


@pytest.mark.parametrize("mode,tasks_key", [("train", "runner__tasks_per_epoch"), ("infer", "runner__infer_tasks")])
def test_two_ranks_union_is_the_single_process_batch(sample, mode, tasks_key):
    cfg = config(**{tasks_key: 20})  # 20 tasks, batches of 8: the last batch is partial (4)
    files = entries(sample / "train")
    single = labels_of(RecDataset(files, cfg, mode=mode))
    r0 = labels_of(RecDataset(files, cfg, mode=mode).shard(0, 2))
    r1 = labels_of(RecDataset(files, cfg, mode=mode).shard(1, 2))
    assert len(single) == 20 and len(r0) == len(r1) == 10
    rebuilt = []
    for b in range(3):  # per batch: rank 0's slice, then rank 1's
        per_rank = [4, 4, 2][b]
        rebuilt += r0[b * 4:b * 4 + per_rank] + r1[b * 4:b * 4 + per_rank]
    assert rebuilt == single


def test_shard_needs_divisible_batch(sample):
    ds = RecDataset(entries(sample / "train"), config(runner__train_batch_size=6))
    with pytest.raises(ValueError, match=r"runner\.train_batch_size: 6 tasks per batch .* 4 ranks"):
        ds.shard(1, 4)
    with pytest.raises(ValueError, match="rank"):
        ds.shard(2, 2)


def test_dataloader_batches_tasks(train):
    import paddle

    loader = paddle.io.DataLoader(train, batch_size=8, num_workers=0)
    batches = [batch for batch in loader]
    assert len(batches) == train.num_batches == 3
    assert [tuple(t.shape) for t in batches[0]] == [(8, 5, 1, 28, 28), (8, 5), (8, 75, 1, 28, 28), (8, 75)]
    np.testing.assert_array_equal(batches[1][3].numpy()[2], train.task(0, 10)[3])


def test_k_query_test_sets_the_evaluation_queries_only(sample):
    cfg = config(hyper_parameters__k_query=1, hyper_parameters__k_query_test=15)
    train, test = RecDataset(entries(sample / "train"), cfg), RecDataset(entries(sample / "test"), cfg, "infer")
    assert train.task(0, 0)[2].shape[0] == 5 and test.task(0, 0)[2].shape[0] == 75
    assert RecDataset(entries(sample / "test"), config(hyper_parameters__k_query=1), "infer").task(0, 0)[2].shape[0] == 5
    with pytest.raises(ValueError, match=r"hyper_parameters\.k_query_test: hyper_parameters\.k_spt \+ "
                                         r"hyper_parameters\.k_query_test = 21 exceeds the 20"):
        RecDataset(entries(sample / "test"), config(hyper_parameters__k_query_test=20), "valid")


# ----- rotations -----
def test_rotations_make_four_classes_per_character(tmp_path):
    root = make_tree(tmp_path / "data", {"g": {"c1": 20, "c2": 20}})
    cfg = config(hyper_parameters__rotations=True, hyper_parameters__n_way=8, hyper_parameters__k_query=1)
    ds = RecDataset(entries(root), cfg)
    assert (ds.num_characters, ds.num_classes) == (2, 8)
    ep = ds.episode(0, 0)
    x_spt = ds.task(0, 0)[0]
    assert sorted(ep.spt_classes.tolist()) == list(range(8))
    base = ds._images  # decoded, unrotated
    for x, image, cls in zip(x_spt, ep.spt_images, ep.spt_classes):
        want = np.rot90(base[image], cls % 4).astype(np.float32) / 255.0 * 2.0 - 1.0
        np.testing.assert_array_equal(x[0], want)
        if cls % 4:
            assert not np.array_equal(x[0], base[image].astype(np.float32) / 255.0 * 2.0 - 1.0)
    with pytest.raises(ValueError, match=r"n_way = 9 but .* only 2 characters \(8 classes with rotations\)"):
        RecDataset(entries(root), dict(cfg, **{"hyper_parameters.n_way": 9}))


def test_rotations_test_sets_the_evaluation_classes_only(sample):
    cfg = config(hyper_parameters__rotations=True, hyper_parameters__rotations_test=False)
    train = RecDataset(entries(sample / "train"), cfg)
    assert train.num_classes == 4 * train.num_characters
    for mode in ("valid", "infer"):
        ds = RecDataset(entries(sample / "test"), cfg, mode)
        assert (ds.rotations, ds.num_classes) == (False, ds.num_characters)
        x_spt, ep = ds.task(0, 0)[0], ds.episode(0, 0)
        for x, image in zip(x_spt, ep.spt_images):  # the images as decoded, unturned
            np.testing.assert_array_equal(x[0], ds._images[image].astype(np.float32) / 255.0 * 2.0 - 1.0)
    # unset, evaluation follows rotations (the Vinyals protocol rotates its test characters too)
    assert RecDataset(entries(sample / "test"), config(hyper_parameters__rotations=True), "infer").rotations
    with pytest.raises(ValueError, match=r"hyper_parameters\.rotations_test: must be true or false"):
        RecDataset(entries(sample / "test"), dict(cfg, **{"hyper_parameters.rotations_test": 1}), "valid")


def test_rotated_copies_stay_in_their_split(sample):
    cfg = config(hyper_parameters__rotations=True)
    used = {}
    for split in ("train", "test"):
        ds = RecDataset(entries(sample / split), cfg, mode="train" if split == "train" else "infer")
        assert ds.num_classes == 4 * ds.num_characters
        paths = {ds.image_paths[i] for k in range(30) for i in ds.episode(0, k).qry_images}
        assert all(p.startswith(str(sample / split) + os.sep) for p in paths)
        used[split] = {os.path.basename(os.path.dirname(os.path.dirname(p))) + "/" + os.path.basename(p)
                       for p in paths}
    assert not used["train"] & used["test"]


# ----- train_shift -----
def test_shifted_moves_each_image_and_fills_with_paper():
    images = np.full((3, 5, 5), 255, dtype=np.uint8)
    images[:, 2, 2] = 0  # one ink dot in the middle
    images[2, 0, 4] = 7  # and, in the third image, one in the top-right corner
    out = omniglot_reader.shifted(images, np.array([[0, 0], [1, -2], [-2, 2]]))
    np.testing.assert_array_equal(out[0], images[0])
    assert list(zip(*np.nonzero(out[1] != 255))) == [(3, 0)]  # down 1, left 2
    assert list(zip(*np.nonzero(out[2] != 255))) == [(0, 4)]  # up 2, right 2; the corner dot left the frame
    assert out.dtype == np.uint8 and out.shape == images.shape


def best_offset(image, original, shift):
    """The (down, right) within +-shift that turns original into image, or None."""
    for down in range(-shift, shift + 1):
        for right in range(-shift, shift + 1):
            if np.array_equal(image, omniglot_reader.shifted(original[None], np.array([[down, right]]))[0]):
                return down, right
    return None


def test_train_shift_moves_training_images_only_and_keeps_the_tasks(sample):
    plain = RecDataset(entries(sample / "train"), config(hyper_parameters__rotations=True))
    shifted = RecDataset(entries(sample / "train"), config(hyper_parameters__rotations=True,
                                                           hyper_parameters__train_shift=2))
    offsets = set()
    for index in range(6):
        ep, ep_shifted = plain.episode(1, index), shifted.episode(1, index)
        for a, b in zip(ep, ep_shifted):  # the same classes, drawings, labels and order
            np.testing.assert_array_equal(a, b)
        task, task_shifted = plain.task(1, index), shifted.task(1, index)
        np.testing.assert_array_equal(task[1], task_shifted[1])
        np.testing.assert_array_equal(task[3], task_shifted[3])
        for x, x_shifted in ((task[0], task_shifted[0]), (task[2], task_shifted[2])):
            as_uint8 = np.rint((x[:, 0] + 1.0) / 2.0 * 255.0).astype(np.uint8)
            as_uint8_shifted = np.rint((x_shifted[:, 0] + 1.0) / 2.0 * 255.0).astype(np.uint8)
            for image, original in zip(as_uint8_shifted, as_uint8):
                offset = best_offset(image, original, 2)
                assert offset is not None
                offsets.add(offset)
        # the same task twice: the same offsets
        for a, b in zip(task_shifted, shifted.task(1, index)):
            np.testing.assert_array_equal(a, b)
    assert len(offsets) > 10 and {abs(d) for offset in offsets for d in offset} == {0, 1, 2}
    for mode in ("valid", "infer"):  # evaluation reads the images as drawn
        cfg = config(hyper_parameters__train_shift=2)
        for a, b in zip(RecDataset(entries(sample / "test"), cfg, mode).task(0, 3),
                        RecDataset(entries(sample / "test"), config(), mode).task(0, 3)):
            np.testing.assert_array_equal(a, b)
    assert plain.train_shift == 0 and shifted.train_shift == 2


# ----- random affine distortions (train_rotate, train_shear, train_scale with train_shift) -----
SMALL = dict(hyper_parameters__k_query=2)  # 5-way, 1 support + 2 queries per class: 15 images a task
# The offsets today's train_shift (whole pixels, nothing else) gives tasks 0 and 1 of epoch 1 of the sample with
# runner.seed 2026 and SMALL: [support (down, right) per image, query (down, right) per image], frozen from the
# implementation before the other distortions existed. config_bigdata.yaml's documented results rest on them.
FROZEN_SHIFTS = {
    0: ([[0, 0], [-2, 0], [-2, -2], [-2, -1], [1, 2]],
        [[-2, -2], [0, -1], [-2, -2], [2, 1], [1, 1], [-2, -1], [-2, -1], [2, -1], [-1, 1], [-2, -1]]),
    1: ([[-1, -1], [0, 1], [-1, -2], [1, 0], [2, 2]],
        [[-1, -1], [1, -2], [-2, 0], [-2, 1], [1, 0], [2, -2], [0, 1], [-1, 2], [0, 0], [-2, -1]]),
}


def as_uint8(x):
    """The reader's network input [n, 1, H, W] back as the uint8 images it came from."""
    return np.rint((x[:, 0] + 1.0) / 2.0 * 255.0).astype(np.uint8)


def moved(image, down, right):
    """image moved by whole pixels, paper where it uncovers: written independently of the reader's shifted()."""
    out = np.full_like(image, 255)
    height, width = image.shape
    out[max(down, 0):height + min(down, 0), max(right, 0):width + min(right, 0)] = \
        image[max(-down, 0):height - max(down, 0), max(-right, 0):width - max(right, 0)]
    return out


@pytest.mark.parametrize("extra", [{}, {"hyper_parameters.train_rotate": 0, "hyper_parameters.train_shear": 0.0,
                                        "hyper_parameters.train_scale": 0}])
def test_train_shift_alone_gives_the_pixels_it_always_gave(sample, extra):
    plain = RecDataset(entries(sample / "train"), config(**SMALL))
    cfg = config(**SMALL, hyper_parameters__train_shift=2)
    cfg.update(extra)
    shifted = RecDataset(entries(sample / "train"), cfg)
    for index, offsets in FROZEN_SHIFTS.items():
        task, task_shifted = plain.task(1, index), shifted.task(1, index)
        for x, x_shifted, part in ((task[0], task_shifted[0], offsets[0]), (task[2], task_shifted[2], offsets[1])):
            expected = np.stack([moved(image, *offset) for image, offset in zip(as_uint8(x), part)])
            np.testing.assert_array_equal(x_shifted, omniglot_reader.to_network_input(expected))


DISTORT = {"hyper_parameters.train_rotate": 20, "hyper_parameters.train_shear": 10.0,
           "hyper_parameters.train_scale": 0.2, "hyper_parameters.train_shift": 2}


def recorded_draws(monkeypatch, dataset, tasks):
    """{(epoch, index): (angle, shear, scale, offsets) arrays of the support images} as the reader draws them."""
    calls, real = [], omniglot_reader.affine_distorted

    def spy(images, angle, shear, scale, offsets):
        calls.append((np.array(angle), np.array(shear), np.array(scale), np.array(offsets)))
        return real(images, angle, shear, scale, offsets)

    monkeypatch.setattr(omniglot_reader, "affine_distorted", spy)
    draws = {}
    for epoch, index in tasks:
        del calls[:]
        dataset.task(epoch, index)
        draws[(epoch, index)] = calls[0]  # the support set's call (then the query set's)
    return draws


def test_distortions_off_by_default_and_all_zero_is_no_distortion(sample):
    default = RecDataset(entries(sample / "train"), config(**SMALL))
    zero = RecDataset(entries(sample / "train"), config(**SMALL, **{k.replace(".", "__"): 0 for k in DISTORT}))
    assert default.distortion == zero.distortion == (0, 0, 0, 0)
    for a, b in zip(default.task(0, 2), zero.task(0, 2)):
        np.testing.assert_array_equal(a, b)


def test_distortions_are_drawn_from_the_task_within_range(sample, monkeypatch):
    cfg = config(**SMALL)
    cfg.update(DISTORT)
    plain = RecDataset(entries(sample / "train"), config(**SMALL))
    first, second = (RecDataset(entries(sample / "train"), cfg) for _ in range(2))
    for a, b in zip(first.task(1, 0), second.task(1, 0)):  # a fresh reader (a resumed run): the same task
        np.testing.assert_array_equal(a, b)
    task, task_plain = first.task(1, 0), plain.task(1, 0)
    for a, b in zip(first.episode(1, 0), plain.episode(1, 0)):  # the same classes, drawings and labels
        np.testing.assert_array_equal(a, b)
    assert all((as_uint8(task[k]) != as_uint8(task_plain[k])).any(axis=(1, 2)).mean() > 0.8 for k in (0, 2))
    draws = recorded_draws(monkeypatch, first, [(1, 0), (1, 1), (2, 0)])
    for angle, shear, scale, offsets in draws.values():
        assert np.abs(angle).max() <= 20 and np.abs(shear).max() <= 10 and np.abs(scale - 1).max() <= 0.2
        assert np.abs(offsets).max() <= 2 and offsets.dtype.kind == "i"
    for a, b in zip(draws[(1, 0)], draws[(1, 1)]):  # another task, or another epoch: other draws
        assert not np.array_equal(a, b)
    for a, b in zip(draws[(1, 0)], draws[(2, 0)]):
        assert not np.array_equal(a, b)
    for a, b in zip(draws[(1, 0)], recorded_draws(monkeypatch, second, [(1, 0)])[(1, 0)]):  # the same task again
        np.testing.assert_array_equal(a, b)
    # Another seed: other draws. And the offsets are train_shift's alone: the same with the others on or off.
    reseeded = recorded_draws(monkeypatch, RecDataset(entries(sample / "train"), dict(cfg, **{"runner.seed": 7})),
                              [(1, 0)])
    assert not np.array_equal(reseeded[(1, 0)][0], draws[(1, 0)][0])
    np.testing.assert_array_equal(draws[(1, 0)][3], FROZEN_SHIFTS[0][0])


def test_distortions_never_touch_validation_or_test(sample):
    cfg = config(**SMALL)
    cfg.update(DISTORT)
    for mode in ("valid", "infer", "test"):
        distorted = RecDataset(entries(sample / "test"), cfg, mode)
        assert distorted.distortion == (0, 0, 0, 0)
        for a, b in zip(distorted.task(0, 3), RecDataset(entries(sample / "test"), config(**SMALL), mode).task(0, 3)):
            np.testing.assert_array_equal(a, b)


def test_support_copies_are_moved_drawings_with_their_labels_and_change_no_other_draw(sample):
    """Each of a task's support drawings gets its copies, each the drawing moved by at most train_shift (with the
    shift alone, checked pixel for pixel), labelled as it; the task's own images, distortions included, are those
    of the same config without copies. In evaluation the support drawings themselves stay as drawn."""
    shift_only = dict(SMALL, hyper_parameters__train_shift=2)
    for mode, folder in (("train", "train"), ("infer", "test"), ("valid", "test")):
        plain = RecDataset(entries(sample / folder), config(**shift_only), mode)
        copied = RecDataset(entries(sample / folder), config(**shift_only, hyper_parameters__support_copies=3), mode)
        drawn = RecDataset(entries(sample / folder), config(**SMALL), mode)  # the drawings, never moved
        assert copied.support_copies == 3
        for index in (0, 1):
            base, task, raw = plain.task(1, index), copied.task(1, index), drawn.task(1, index)
            n = len(base[1])
            assert task[0].shape == (4 * n,) + base[0].shape[1:] and task[1].shape == (4 * n,)
            np.testing.assert_array_equal(task[0][:n], base[0])
            np.testing.assert_array_equal(task[1], np.concatenate([base[1], np.repeat(base[1], 3)]))
            for a, b in zip(task[2:], base[2:]):
                np.testing.assert_array_equal(a, b)
            copies = as_uint8(task[0][n:])
            for i, image in enumerate(as_uint8(raw[0])):
                shifts = {(down, right): moved(image, down, right) for down in range(-2, 3) for right in range(-2, 3)}
                for copy in copies[3 * i:3 * i + 3]:
                    assert any(np.array_equal(copy, candidate) for candidate in shifts.values())
            assert len({copy.tobytes() for copy in copies}) > n  # moved at random, not all alike
    first, again = (RecDataset(entries(sample / "test"), config(**shift_only, hyper_parameters__support_copies=3),
                               "infer") for _ in range(2))
    for a, b in zip(first.task(1, 0), again.task(1, 0)):  # a fresh reader: the same copies
        np.testing.assert_array_equal(a, b)


def test_support_copies_test_decides_evaluation_and_falls_back_to_training(sample):
    cfg = config(**SMALL, hyper_parameters__train_rotate=10.0, hyper_parameters__support_copies=2)
    assert RecDataset(entries(sample / "train"), cfg).support_copies == 2
    assert RecDataset(entries(sample / "test"), cfg, "infer").support_copies == 2
    cfg["hyper_parameters.support_copies_test"] = 5
    assert RecDataset(entries(sample / "train"), cfg).support_copies == 2
    for mode in ("infer", "valid"):
        evaluation = RecDataset(entries(sample / "test"), cfg, mode)
        assert evaluation.support_copies == 5 and evaluation.task(0, 0)[0].shape[0] == 5 * 6
    cfg["hyper_parameters.support_copies_test"] = 0
    assert RecDataset(entries(sample / "test"), cfg, "infer").task(0, 0)[0].shape[0] == 5


@pytest.mark.parametrize("key", ["hyper_parameters.support_copies", "hyper_parameters.support_copies_test"])
def test_support_copies_without_a_distortion_is_an_error_naming_the_key(sample, key):
    cfg = config(**SMALL)
    cfg[key] = 2
    with pytest.raises(ValueError, match=f"^{key}: 2 copies .* no distortion is on"):
        RecDataset(entries(sample / "test"), cfg, "infer")
    cfg[key] = -1
    with pytest.raises(ValueError, match=f"^{key}: must be a non-negative integer"):
        RecDataset(entries(sample / "test"), cfg, "infer")


def test_affine_distorted_turns_like_pil_and_moves_like_shifted(sample, train):
    glyphs = train.task(0, 0)[0]  # 5 drawings of the sample
    images = as_uint8(glyphs)
    n = len(images)
    for angle in (20.0, -180.0):  # the largest turns train_rotate allows in a config of 20, and at all
        turned = omniglot_reader.affine_distorted(images, np.full(n, angle), np.zeros((n, 2)), np.ones((n, 2)),
                                                  np.zeros((n, 2), dtype=int))
        by_pil = np.stack([np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR, fillcolor=255))
                           for image in images])
        assert np.abs(turned.astype(int) - by_pil).max() <= 1
        assert np.abs(turned.astype(int) - images).mean() > 5  # it really turned
    half = omniglot_reader.affine_distorted(images, np.full(n, 180.0), np.zeros((n, 2)), np.ones((n, 2)),
                                            np.zeros((n, 2), dtype=int))
    assert np.abs(half.astype(int) - images[:, ::-1, ::-1]).max() <= 1  # a half turn: upside down and mirrored
    offsets = np.array([[0, 0], [1, -2], [-2, 2], [3, 0], [0, -3]])
    np.testing.assert_array_equal(
        omniglot_reader.affine_distorted(images, np.zeros(n), np.zeros((n, 2)), np.ones((n, 2)), offsets),
        omniglot_reader.shifted(images, offsets))
    # A shear along x slants vertical strokes; a scale below 1 leaves more paper around the glyph.
    bar = np.full((1, 28, 28), 255, dtype=np.uint8)
    bar[0, 4:24, 13:15] = 0  # a vertical bar through the centre
    slanted = omniglot_reader.affine_distorted(bar, np.zeros(1), np.array([[30.0, 0.0]]), np.ones((1, 2)),
                                               np.zeros((1, 2), dtype=int))[0]
    ink_columns = [np.nonzero(row < 128)[0].mean() for row in slanted[4:24] if (row < 128).any()]
    assert ink_columns[-1] - ink_columns[0] > 8  # y points down: the bar's foot 20 * tan(30 deg) ~ 11.5 px right
    small = omniglot_reader.affine_distorted(bar, np.zeros(1), np.zeros((1, 2)), np.full((1, 2), 0.5),
                                             np.zeros((1, 2), dtype=int))[0]
    rows = np.nonzero((small < 128).any(axis=1))[0]
    assert 9 <= rows.max() - rows.min() + 1 <= 11  # the 20-pixel bar is 10 pixels tall


# ----- decode cache -----
def test_cache_built_once_reused_and_rebuilt_on_change(tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}, "h": {"c1": 20}})
    cfg = config(hyper_parameters__n_way=3)
    first = RecDataset(entries(root), cfg)
    assert first.cache_status == "built"
    assert first.cache_path == str(tmp_path / ".cache" / "split-28px.npz")
    mtime = os.stat(first.cache_path).st_mtime_ns
    second = RecDataset(entries(root), cfg)
    assert second.cache_status == "loaded" and os.stat(first.cache_path).st_mtime_ns == mtime
    np.testing.assert_array_equal(first.task(0, 0)[2], second.task(0, 0)[2])
    # rewrite one image: same name, new pixels
    target = root / "g" / "c1" / "0000.png"
    Image.new("1", (105, 105), 0).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = RecDataset(entries(root), cfg)
    assert third.cache_status == "built"
    assert (third._images[0] == 0).all() and not (first._images[0] == 0).all()
    assert RecDataset(entries(root), cfg).cache_status == "loaded"
    assert RecDataset(entries(root), config(hyper_parameters__n_way=3, hyper_parameters__imgsize=14)).cache_status == "built"
    assert not [n for n in os.listdir(tmp_path / ".cache") if ".tmp-" in n]


def test_a_fifo_in_place_of_the_cache_is_replaced_not_waited_on(tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}})
    (tmp_path / ".cache").mkdir()
    os.mkfifo(tmp_path / ".cache" / "split-28px.npz")
    with deadline():
        ds = RecDataset(entries(root), config(hyper_parameters__n_way=2))
    assert ds.cache_status == "built" and os.path.isfile(tmp_path / ".cache" / "split-28px.npz")


def test_cache_falls_back_when_data_folder_is_not_writable(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}})
    (tmp_path / ".cache").write_text("not a folder")  # blocks the cache next to the data
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    cfg = config(hyper_parameters__n_way=2)
    ds = RecDataset(entries(root), cfg)
    assert ds.cache_status == "built" and ds.cache_path.startswith(str(tmp_path / "user" / "paddlerec_maml"))
    assert RecDataset(entries(root), cfg).cache_status == "loaded"
    (tmp_path / "nowhere").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nowhere"))
    blocked = RecDataset(entries(root), cfg)  # no writable cache anywhere: still works
    assert blocked.cache_status == "disabled" and blocked.cache_path is None
    assert blocked.task(0, 0)[0].shape == (2, 1, 28, 28)


def counting_decodes(monkeypatch):
    """A list that receives every image path the reader decodes from here on (the warm start's cost)."""
    decoded, real_decode = [], omniglot_reader.decode_image
    monkeypatch.setattr(omniglot_reader, "decode_image",
                        lambda path, *args: (decoded.append(path), real_decode(path, *args))[1])
    return decoded


def test_warm_cache_startup_on_sample(sample, monkeypatch):
    # A warm start must not decode a single image: a count, not a wall-clock bound a loaded machine could miss.
    RecDataset(entries(sample / "train"), config())
    decoded = counting_decodes(monkeypatch)
    start = time.perf_counter()
    ds = RecDataset(entries(sample / "train"), config())
    print(f"sample warm start: {time.perf_counter() - start:.3f}s")
    assert ds.cache_status == "loaded" and decoded == []


def test_warm_cache_startup_on_full_omniglot_train(omniglot_splits, monkeypatch):
    out, _ = omniglot_splits
    files = entries(out / "omniglot_train")
    decoded = counting_decodes(monkeypatch)
    start = time.perf_counter()
    cold = RecDataset(files, config())
    cold_s, cold_decoded = time.perf_counter() - start, len(decoded)
    start = time.perf_counter()
    warm = RecDataset(files, config())
    warm_s = time.perf_counter() - start
    print(f"full train split: cold {cold_s:.2f}s ({cold.cache_status}, {cold_decoded} images decoded), warm {warm_s:.2f}s")
    assert (warm.num_characters, len(warm.image_paths)) == (973, 19460)
    assert warm.cache_status == "loaded" and len(decoded) == cold_decoded  # nothing decoded by the warm start
    assert cold.cache_status == "loaded" or cold_decoded == 19460


# ----- user errors: one line naming the key or path -----
class FakeConfig(dict):
    """Stands for the trainer's Config: errors carry the config file name."""

    def error(self, key_or_path, message):
        return RuntimeError(f"config.yaml: {key_or_path}: {message}")


@pytest.mark.parametrize("key,value,pattern", [
    ("hyper_parameters.n_way", 0, r"hyper_parameters\.n_way: must be a positive integer, got 0"),
    ("hyper_parameters.k_spt", -1, r"hyper_parameters\.k_spt: must be a positive"),
    ("hyper_parameters.k_query", 2.5, r"hyper_parameters\.k_query: must be a positive"),
    ("hyper_parameters.imgsize", 0, r"hyper_parameters\.imgsize: must be a positive"),
    ("runner.tasks_per_epoch", 0, r"runner\.tasks_per_epoch: must be a positive"),
    ("runner.train_batch_size", True, r"runner\.train_batch_size: must be a positive"),
    ("hyper_parameters.n_way", None, r"hyper_parameters\.n_way: missing"),
    ("runner.seed", -3, r"runner\.seed: must be a non-negative integer"),
    ("hyper_parameters.rotations", "yes", r"hyper_parameters\.rotations: must be true or false"),
    ("hyper_parameters.train_shift", -1, r"hyper_parameters\.train_shift: must be a non-negative integer"),
    ("hyper_parameters.train_shift", 14, r"hyper_parameters\.train_shift: 14 pixels would move a 28-pixel image off "
                                         r"itself; use less than 14"),
    ("hyper_parameters.train_rotate", -1, r"hyper_parameters\.train_rotate: must be at least 0 and at most 180, "
                                          r"got -1$"),
    ("hyper_parameters.train_rotate", 200.5, r"hyper_parameters\.train_rotate: must be at least 0 and at most 180"),
    ("hyper_parameters.train_rotate", "10", r"hyper_parameters\.train_rotate: must be a number, got '10'$"),
    ("hyper_parameters.train_shear", 46, r"hyper_parameters\.train_shear: must be at least 0 and at most 45"),
    ("hyper_parameters.train_shear", True, r"hyper_parameters\.train_shear: must be a number, got True"),
    ("hyper_parameters.train_scale", 1.0, r"hyper_parameters\.train_scale: must be at least 0 and below 1, got 1\.0"),
    ("hyper_parameters.train_scale", float("nan"), r"hyper_parameters\.train_scale: must be at least 0 and below 1"),
    ("hyper_parameters.k_query", 20, r"hyper_parameters\.k_query: hyper_parameters\.k_spt \+ "
                                     r"hyper_parameters\.k_query = 21 exceeds the 20"),
])
def test_bad_options_name_the_key(sample, key, value, pattern):
    cfg = config()
    cfg.pop(key) if value is None else cfg.update({key: value})
    with pytest.raises(ValueError, match=pattern):
        RecDataset(entries(sample / "train"), cfg)


def test_errors_go_through_config_error(sample):
    cfg = FakeConfig(config(**{"hyper_parameters__n_way": 41}))
    with pytest.raises(RuntimeError, match=r"^config\.yaml: hyper_parameters\.n_way: n_way = 41 but "
                                           r".*train has only 40 characters$"):
        RecDataset(entries(sample / "train"), cfg)


def test_no_character_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "0001_01.png").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path}: no character folders found"):
        RecDataset(entries(tmp_path), config())
    with pytest.raises(ValueError, match=r"runner\.train_data_dir: no character folders"):
        RecDataset([], config())
    with pytest.raises(ValueError, match=r"runner\.test_data_dir: no character folders"):
        RecDataset([], config(), mode="infer")


def test_undecodable_image_is_named(tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}})
    bad = root / "g" / "c2" / "0005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=f"^{bad}: cannot decode image"):
        RecDataset(entries(root), config(hyper_parameters__n_way=2))


# ----- one decoder for every kind of PNG -----
def png_file(path, samples, color_type, depth, palette=None, trns=None):
    """Write a PNG by hand, so every colour type and bit depth of the format is covered (PIL writes only some).

    samples: [h, w] or [h, w, channels] integers at `depth` bits; palette: [(r, g, b)]; trns: the tRNS chunk."""
    samples = np.asarray(samples)
    height, width = samples.shape[:2]
    rows = samples.reshape(height, -1)
    if depth == 16:
        packed = rows.astype(">u2").view(np.uint8).reshape(height, -1)
    elif depth == 8:
        packed = rows.astype(np.uint8)
    else:  # 1, 2 or 4 bits a sample, most significant first, each row padded to whole bytes
        bits = (rows[..., None] >> np.arange(depth - 1, -1, -1)) & 1
        packed = np.packbits(bits.reshape(height, -1).astype(np.uint8), axis=1)
    raw = b"".join(b"\0" + row.tobytes() for row in packed)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
    if palette is not None:
        body += chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).ravel()))
    if trns is not None:
        body += chunk(b"tRNS", trns)
    body += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


INK, GREY_INK, PAPER_LEVEL = 0, 85, 255  # 85 = 0x55: a level 2-, 4-, 8- and 16-bit grey can all store exactly


def glyph(grey=True):
    """A 32x32 drawing: black strokes and (grey=True) a dark-grey one on white paper, uint8."""
    image = np.full((32, 32), PAPER_LEVEL, np.uint8)
    image[4:28, 6:10] = INK
    image[20:24, 4:28] = INK
    if grey:
        image[6:18, 20:25] = GREY_INK
    return image


def saved_as(path, image, kind):
    """`image` (uint8 grey, ink dark) written as one kind of image file a person can make."""
    alpha = 255 - image.astype(np.int64)  # ink opaque, paper transparent
    black = np.zeros_like(alpha)
    key = 200  # the level a tRNS colour key marks as transparent: stored where the paper is
    if kind == "grey8+key" or kind == "grey16+key":
        depth, scale = (8, 1) if kind == "grey8+key" else (16, 257)
        stored = np.where(image == PAPER_LEVEL, key, image).astype(np.int64) * scale
        return png_file(path, stored, 0, depth, trns=struct.pack(">H", key * scale))
    if kind in ("rgb8", "rgb16"):
        depth = int(kind[3:])
        return png_file(path, np.stack([image] * 3, -1).astype(np.int64) * (2 ** depth - 1) // 255, 2, depth)
    if kind == "rgb8+key":
        stored = np.stack([image] * 3, -1).astype(np.int64)
        stored[image == PAPER_LEVEL] = (10, key, 30)  # a green the file marks as transparent
        return png_file(path, stored, 2, 8, trns=struct.pack(">HHH", 10, key, 30))
    if kind in ("grey+alpha8", "grey+alpha16"):  # black ink whose opacity draws the glyph, on nothing
        depth = int(kind[10:])
        scale = (2 ** depth - 1) // 255
        return png_file(path, np.stack([black, alpha * scale], -1), 4, depth)
    if kind in ("rgba8", "rgba16"):  # the usual export of a drawing app: black ink on a transparent background
        depth = int(kind[4:])
        scale = (2 ** depth - 1) // 255
        return png_file(path, np.stack([black, black, black, alpha * scale], -1), 6, depth)
    if kind.startswith("grey"):
        depth = int(kind[4:])
        return png_file(path, image.astype(np.int64) * (2 ** depth - 1) // 255, 0, depth)
    if kind.startswith("palette"):  # palette index = position of the level in `levels`
        levels = sorted(set(image.ravel().tolist()))
        index = np.searchsorted(levels, image)
        depth = int(kind[7:].split("+")[0])
        palette = [(level, level, level) for level in levels]
        if kind.endswith("+transparent"):  # paper's entry fully transparent, and black underneath
            palette[levels.index(PAPER_LEVEL)] = (0, 0, 0)
            trns = bytes(0 if level == PAPER_LEVEL else 255 for level in levels)
            return png_file(path, index, 3, depth, palette, trns)
        return png_file(path, index, 3, depth, palette)
    pil = Image.fromarray(image)
    if kind == "I;16":  # as PIL writes a 16-bit grey PNG
        pil = Image.fromarray(image.astype(np.uint16) * 257)
    elif kind == "I":  # 32-bit integer grey, as in a TIFF
        pil = Image.fromarray(image.astype(np.int32) * 257)
    elif kind.startswith("pil-"):
        pil = pil.convert(kind[4:])
    pil.save(path)
    return path


BINARY_KINDS = ["grey1", "palette1", "palette1+transparent", "pil-1.png"]
GREY_KINDS = ["grey2", "grey4", "grey8", "grey16", "grey8+key", "grey16+key", "rgb8", "rgb16", "rgb8+key",
              "grey+alpha8", "grey+alpha16", "rgba8", "rgba16", "palette2", "palette4", "palette8",
              "palette8+transparent", "I;16.png", "I.tif", "pil-L.png", "pil-RGB.png", "pil-P.png",
              "pil-RGB.bmp", "pil-L.gif"]


@pytest.mark.parametrize("kind", BINARY_KINDS + GREY_KINDS)
def test_one_glyph_saved_in_every_mode_decodes_to_the_same_array(kind, tmp_path):
    image = glyph(grey=kind not in BINARY_KINDS)
    name, _, ext = kind.partition(".")
    path = saved_as(tmp_path / f"glyph.{ext or 'png'}", image, name)
    decoded = omniglot_reader.decode_image(str(path), 32, {})
    # Laying alpha on white rounds: at most one level off.
    assert np.abs(decoded.astype(int) - image).max() <= 1, (Image.open(path).mode, decoded)
    # Resized, the same glyph: a query saved by a drawing app reads as the training images do.
    reference = omniglot_reader.decode_image(str(saved_as(tmp_path / "ref.png", image, "pil-L")), 28, {})
    assert np.abs(omniglot_reader.decode_image(str(path), 28, {}).astype(int) - reference).max() <= 1


def test_a_photo_is_turned_upright_by_its_orientation_tag(tmp_path):
    """A phone stores a photo as the sensor saw it and an EXIF tag saying how to turn it; viewers show it turned."""
    image = glyph(grey=False)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are the upright image turned 90 degrees counter-clockwise
    for ext, options in ((".jpg", {"quality": 95}), (".png", {})):
        path = tmp_path / f"photo{ext}"
        Image.fromarray(np.rot90(image)).convert("RGB").save(path, exif=exif, **options)
        decoded = omniglot_reader.decode_image(str(path), 32, {}).astype(int)
        assert np.abs(decoded - image).mean() < 2, ext  # JPEG's loss only
        assert np.abs(decoded - np.rot90(image)).mean() > 20, ext


def test_an_omniglot_png_decodes_exactly_as_before(sample):
    """1-bit PNGs (Omniglot's) keep PIL's own conversion: their arrays, and a cache built of them, do not change."""
    for path in sorted((sample / "train").glob("*/*/*.png"))[:40]:
        with Image.open(path) as img:
            assert img.mode == "1"
            before = np.asarray(img.convert("L").resize((28, 28), omniglot_reader.RESAMPLE), dtype=np.uint8)
        assert np.array_equal(omniglot_reader.decode_image(str(path), 28, {}), before)


def test_images_the_decoder_cannot_read_are_named(tmp_path):
    floats = tmp_path / "float.tif"
    Image.fromarray(glyph().astype(np.float32)).save(floats)
    with pytest.raises(ValueError, match=f"^{floats}: cannot decode image \\(32-bit float"):
        omniglot_reader.decode_image(str(floats), 28, {})
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(wide)
    with pytest.raises(ValueError, match=f"^{wide}: cannot decode image \\(grey levels 70000..70000 outside"):
        omniglot_reader.decode_image(str(wide), 28, {})
    white_ink = tmp_path / "white_ink.png"  # a dark-mode drawing app's export: white strokes on nothing
    Image.fromarray(np.stack([np.full((32, 32), 255, np.uint8)] * 3 + [255 - glyph()], -1)).save(white_ink)
    with pytest.raises(ValueError, match=f"^{white_ink}: cannot decode image \\(light ink on a transparent"):
        omniglot_reader.decode_image(str(white_ink), 28, {})
    for data in (b"", b"\x89PNG\r\n\x1a\n", b"GIF89a\x01"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=f"^{bad}: cannot decode image"):
            omniglot_reader.decode_image(str(bad), 28, {})


class Blocked(BaseException):
    """Not an Exception: a broad `except Exception` in the code under test must not swallow the deadline."""


@contextlib.contextmanager
def deadline(seconds=20):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() and raises here."""
    def expired(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "link to a device"])
def test_a_fifo_or_device_named_like_an_image_is_refused_not_skipped(kind, tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}})
    special = root / "g" / "c2" / "0007b.png"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        os.symlink(os.devnull, special)  # a device node needs root to make; a link to one reads the same
    message = f"^{special}: not a regular file \\(a folder, FIFO, device or socket\\)"
    with deadline():
        with pytest.raises(ValueError, match=message):
            RecDataset(entries(root), config(hyper_parameters__n_way=2))
        with pytest.raises(ValueError, match=message):  # predict hands paths to the decoder straight
            omniglot_reader.decode_image(str(special), 28, {})
    (root / "g" / "c2" / "folder.png").mkdir()  # a folder or a dangling link named like an image: not an image
    os.remove(special)
    os.symlink("nowhere.png", special)
    assert len(RecDataset(entries(root), config(hyper_parameters__n_way=2)).image_paths) == 40


def test_the_decoding_bar_stays_off_stderr_when_it_is_not_a_terminal(tmp_path, capsys):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}})
    (root / "g" / "c2" / "0019.png").write_bytes(b"not an image")  # the last one: the bar has run when it fails
    with pytest.raises(ValueError, match="0019.png: cannot decode image"):
        RecDataset(entries(root), config(hyper_parameters__n_way=2))
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal


def test_character_with_too_few_images_is_named(tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 15}})
    with pytest.raises(ValueError, match=f"^{root / 'g' / 'c2'}: has 15 images, fewer than "
                                         r"hyper_parameters\.k_spt \+ hyper_parameters\.k_query = 16"):
        RecDataset(entries(root), config(hyper_parameters__n_way=2))


def test_unknown_mode(sample):
    with pytest.raises(ValueError, match="mode"):
        RecDataset(entries(sample / "train"), config(), mode="eval")


def test_hidden_entries_and_stray_files_are_ignored(tmp_path):
    root = make_tree(tmp_path / "split", {"g": {"c1": 20, "c2": 20}, ".hidden": {"c1": 20}})
    (root / "README.txt").write_text("not a group")
    (root / "g" / "c1" / "notes.txt").write_text("not an image")
    ds = RecDataset(entries(root), config(hyper_parameters__n_way=2))
    assert ds.num_characters == 2 and len(ds.image_paths) == 40
