"""Omniglot episode reader for MAML: N-way K-shot tasks from a two-level image tree.

hyper_parameters.n_way classes per task; hyper_parameters.n_way_test, when set, for
validation and test (training on more classes than the test asks for).

Data layout: data_dir/<group>/<character>/<image>.png (a group is an alphabet);
every character folder is one class (four with hyper_parameters.rotations;
hyper_parameters.rotations_test, when set, decides it for validation and test).
The trainer passes file_list = sorted absolute paths of data_dir's entries.

hyper_parameters.task_sampling picks a task's n_way classes from the whole split
("any", the default) or all from one alphabet ("within_alphabet": Lake et al.'s
one-shot task); task_sampling_test, when set, decides it for validation and test.
Training images can be distorted at random, each on its own (training only): turned by
up to hyper_parameters.train_rotate degrees, sheared by up to train_shear degrees
along each axis, scaled by a factor within 1 +- train_scale along each axis, and moved
by a whole number of pixels, at most train_shift along each axis. With train_shift
alone the images are only moved, pixel for pixel. hyper_parameters.support_copies
(support_copies_test for validation and test) adds that many copies of each support
drawing to the support set, each distorted at random within those same ranges, with the
drawing's label: a one-shot task then adapts on several views of each character.

Each yielded item is one task [x_spt, y_spt, x_qry, y_qry]; the DataLoader
batches tasks into [T, ...]. Task i of epoch e is drawn from its own RNG
seeded with (seed, mode, e, i), so the tasks do not depend on iteration order,
worker count or sharding.
"""
import hashlib
import logging
import os
import stat
import struct
from collections import namedtuple

import numpy as np
import paddle
from PIL import Image, ImageOps
from tqdm import tqdm

import maml_settings as checks

# LANCZOS: the 105x105 1-bit drawings shrink ~4x to 28x28; a wide filter keeps
# thin strokes as grey levels instead of dropping them (BILINEAR aliases).
RESAMPLE = Image.LANCZOS
OMNIGLOT_DRAWINGS = 20  # drawings per character in Omniglot
ROTATIONS = 4  # 0/90/180/270 degrees when hyper_parameters.rotations is true
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TASK_SAMPLINGS = ("any", "within_alphabet")  # hyper_parameters.task_sampling
CACHE_VERSION = 2  # bump when the decoded format changes (2: alpha on white, 16-bit scaled, EXIF orientation)
# PIL modes of 16-bit grey images (a 16-bit PNG opens as "I;16"); their levels are scaled to 8 bits.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
NOT_REGULAR = "not a regular file (a folder, FIFO, device or socket); only image files can be read"
# "test": PaddleRec's name of the infer data. "valid": validation during training (the tools pass it
# because MODES lists it); its own task stream, so validation tasks are not the test tasks even on one folder.
_MODES = {"train": 0, "infer": 1, "test": 1, "valid": 2}
# The shift offsets come from a second generator, seeded like the task's plus this tag: the task's own draws (classes,
# drawings, order) are then the same with and without train_shift.
_SHIFT_STREAM = 1
# The other distortions (turn, shear, scale) from a third one: the offsets are then the same with and without them.
_AFFINE_STREAM = 2
# The support copies' distortions from two more, so that adding copies changes no other draw.
COPY_SHIFT_STREAM, COPY_AFFINE_STREAM = 3, 4
PAPER = 255  # uint8 grey level of the paper, what a shifted image's uncovered edge shows

# The ranges of the random distortions of training images (omniglot_reader's train_* keys); all 0: none.
Distortion = namedtuple("Distortion", "rotate shear scale shift")
# Which images (global indices into image_paths) and classes one task uses,
# in the order of the yielded arrays.
Episode = namedtuple("Episode", "spt_images spt_classes y_spt qry_images qry_classes y_qry")
# The alphabets within-alphabet tasks are drawn from: the first class of each, its number of classes, and the
# running total of those numbers (which alphabet a uniformly drawn class number falls in).
AlphabetPools = namedtuple("AlphabetPools", "starts sizes ends")


def _mode_key(config, mode, key):
    """The key this mode reads: evaluation (valid, infer) reads `<key>_test` when the config sets it."""
    if mode != "train" and config.get(f"{key}_test") is not None:
        return f"{key}_test"
    return key


def distortion_ranges(config):
    """The train_* keys' ranges of the random distortions, as a Distortion."""
    imgsize = checks.positive_int(config, "hyper_parameters.imgsize")
    shift = checks.nonnegative_int(config, "hyper_parameters.train_shift")
    if 2 * shift >= imgsize:
        raise checks.error(config, "hyper_parameters.train_shift",
                           f"{shift} pixels would move a {imgsize}-pixel image off itself; use less than "
                           f"{(imgsize + 1) // 2}")
    ranges = {name: checks.number_in_range(config, f"hyper_parameters.train_{name}")
              for name in ("rotate", "shear", "scale")}
    return Distortion(shift=shift, **ranges)


def support_copies(config, mode):
    """How many distorted copies of each support drawing join the support set in `mode` (support_copies, or
    support_copies_test when evaluating).

    Support augmentation (Ni et al., "Data Augmentation for Meta-Learning", ICML 2021): a one-shot task adapts on
    several views of each drawing. The copies stay within the distortions the network was trained on (the train_*
    ranges), and are made when evaluating too, where the query images stay as drawn."""
    key = _mode_key(config, mode, "hyper_parameters.support_copies")
    copies = checks.nonnegative_int(config, key)
    if copies and not any(distortion_ranges(config)):
        raise checks.error(config, key, f"{copies} copies of each support drawing, but no distortion is on, so they "
                                        "would be the drawing itself; set hyper_parameters.train_rotate, train_shear, "
                                        "train_scale or train_shift")
    return copies


def _mode_of_files(file_list, config):
    """"infer" when file_list is runner.test_data_dir's content and not the training data's, else "train".

    PaddleRec's tools build RecDataset(file_list, config=config) for training and inference alike, so
    without a mode the files' folder tells which settings (batch size, task count, k_query_test) apply.
    """
    base = config.get("config_abs_dir") or os.getcwd()

    def folder(key):
        value = config.get(key)
        return os.path.realpath(os.path.join(base, value)) if isinstance(value, str) else None

    parents = {os.path.realpath(os.path.dirname(path)) for path in file_list}
    test_dir = folder("runner.test_data_dir")
    if test_dir is not None and parents == {test_dir} and test_dir != folder("runner.train_data_dir"):
        return "infer"
    return "train"


class RecDataset(paddle.io.IterableDataset):
    """Stream of N-way K-shot Omniglot tasks (see module docstring).

    Public: set_epoch(e), shard(rank, world_size), episode(e, i), task(e, i),
    len() and num_tasks (tasks of this rank per epoch), num_batches, num_characters,
    num_classes, image_paths, class_dirs, cache_path, cache_status, task_sampling,
    alphabets (every alphabet's folder name), sampled_alphabets and skipped_alphabets
    (within_alphabet: the alphabets tasks are drawn from, and those left out as too small).
    """

    MODES = tuple(_MODES)  # the modes this reader accepts (tools/utils/plugin.py reads it)

    def __init__(self, file_list, config, mode=None):
        super().__init__()
        if mode is None:
            mode = _mode_of_files(file_list, config)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        self.mode, self._mode_id, self._config = mode, _MODES[mode], config
        self._read_options(config, mode)
        self.class_dirs, self.image_paths, starts, counts, groups = _scan(file_list, config, mode)
        self._check_data(config, counts)
        self._start, self._count = np.asarray(starts), np.asarray(counts)
        self.num_characters = len(self.class_dirs)
        self.num_classes = self.num_characters * (ROTATIONS if self.rotations else 1)
        if self.n_way > self.num_classes:
            extra = f" ({self.num_classes} classes with rotations)" if self.rotations else ""
            raise checks.error(config, self._way_key,
                               f"{self._way_name} = {self.n_way} but {self.data_dir} has only "
                               f"{self.num_characters} characters{extra}")
        self.alphabets = [os.path.basename(path) for path, _, _ in groups]
        self.sampled_alphabets, self.skipped_alphabets = list(self.alphabets), []
        self._pools = self._alphabet_pools(config, groups) if self.task_sampling == "within_alphabet" else None
        self._images, self.cache_path, self.cache_status = _load_images(
            self.data_dir, self.image_paths, self.imgsize, config)
        self.epoch = 0
        self.shard(0, 1)

    # ----- configuration -----
    def _read_options(self, config, mode):
        # Evaluation may ask for fewer classes per task than training uses (n_way_test): training on more ways
        # than the test has is what prototypical networks found to pay.
        self._way_key = _mode_key(config, mode, "hyper_parameters.n_way")
        self._way_name = self._way_key.rsplit(".", 1)[1]
        self.n_way = checks.positive_int(config, self._way_key)
        self.k_spt = checks.positive_int(config, "hyper_parameters.k_spt")
        # Evaluation may score more query images per task than training uses (k_query_test): a tighter
        # estimate of each task's accuracy at no cost to training.
        self._query_key = _mode_key(config, mode, "hyper_parameters.k_query")
        self.k_query = checks.positive_int(config, self._query_key)
        self.imgsize = checks.positive_int(config, "hyper_parameters.imgsize")
        if self.k_spt + self.k_query > OMNIGLOT_DRAWINGS:
            raise checks.error(config, self._query_key,
                               f"hyper_parameters.k_spt + {self._query_key} = "
                               f"{self.k_spt + self.k_query} exceeds the {OMNIGLOT_DRAWINGS} "
                               "drawings of an Omniglot character")
        self.seed = checks.nonnegative_int(config, "runner.seed")
        # rotations_test lets training add rotated copies of its characters as extra classes (augmentation)
        # while validation and test use the split as it is.
        rotations_key = _mode_key(config, mode, "hyper_parameters.rotations")
        self.rotations = checks.boolean(config, rotations_key)
        # Lake et al.'s one-shot task takes all classes of a task from one alphabet (harder: the characters of
        # one alphabet share their strokes and style). `_test` lets evaluation sample otherwise than training.
        self._sampling_key = _mode_key(config, mode, "hyper_parameters.task_sampling")
        self.task_sampling = checks.choice(config, self._sampling_key, TASK_SAMPLINGS)
        self._skip_key = _mode_key(config, mode, "hyper_parameters.skip_small_alphabets")
        self.skip_small_alphabets = checks.boolean(config, self._skip_key)
        # Random affine distortions against over-fitting to the few training characters (Koch et al. 2015 distort
        # Omniglot images so). Training only: validation and test images stay as drawn.
        self.copy_distortion = distortion_ranges(config)
        self.distortion = self.copy_distortion if mode == "train" else Distortion(0.0, 0.0, 0.0, 0)
        self.train_shift = self.distortion.shift
        self.support_copies = support_copies(config, mode)
        if mode == "train":
            self._tasks_key, self._batch_key = "runner.tasks_per_epoch", "runner.train_batch_size"
            self.tasks_per_epoch = checks.positive_int(config, self._tasks_key)
        else:
            self._tasks_key, self._batch_key = "runner.infer_tasks", "runner.infer_batch_size"
            self.tasks_per_epoch = checks.positive_int(config, self._tasks_key)
        self.batch_size = checks.positive_int(config, self._batch_key)

    def _check_data(self, config, counts):
        need = self.k_spt + self.k_query
        for class_dir, count in zip(self.class_dirs, counts):
            if count < need:
                raise checks.error(config, class_dir,
                                   f"has {count} images, fewer than hyper_parameters.k_spt + "
                                   f"{self._query_key} = {need}")

    def _alphabet_pools(self, config, groups):
        """The alphabets within-alphabet tasks come from; an error naming those with fewer than n_way classes,
        or, with skip_small_alphabets, a warning naming them and the pools of the others.

        With rotations a rotated copy of a character is one more class OF ITS ALPHABET (the same strokes, turned):
        an alphabet then offers 4x its characters, and a task may hold a character and its rotated copy, as
        rotations already allow with "any". Characters are scanned alphabet by alphabet and class =
        character * per_class + turn, so an alphabet's classes are one contiguous range.
        """
        per_class = ROTATIONS if self.rotations else 1
        unit = "classes (characters x 4 rotations)" if self.rotations else "characters"
        kept, small = [], []
        for path, first, count in groups:
            (kept if count * per_class >= self.n_way else small).append((path, first, count))
        self.sampled_alphabets = [os.path.basename(path) for path, _, _ in kept]
        self.skipped_alphabets = [os.path.basename(path) for path, _, _ in small]
        named = ", ".join(f"{os.path.basename(path)} ({count * per_class})" for path, _, count in small)
        if small and not kept:
            raise checks.error(config, self._sampling_key,
                               f"within_alphabet: no alphabet of {self.data_dir} has {self._way_name} = {self.n_way} "
                               f"{unit}: {named}")
        if small and not self.skip_small_alphabets:
            raise checks.error(config, self._sampling_key,
                               f"within_alphabet: {len(small)} alphabet(s) of {self.data_dir} have fewer than "
                               f"{self._way_name} = {self.n_way} {unit}: {named}; lower {self._way_key}, or set "
                               f"{self._skip_key}: true to leave them out")
        if small:
            left_out = sum(count for _, _, count in small)
            _warn_once(f"{self.data_dir}: {self._skip_key}: {len(small)} alphabet(s) with fewer than "
                       f"{self._way_name} = {self.n_way} {unit} left out of {self.mode} tasks ({left_out} characters unused): {named}")
        sizes = np.array([count * per_class for _, _, count in kept], dtype=np.int64)
        starts = np.array([first * per_class for _, first, _ in kept], dtype=np.int64)
        return AlphabetPools(starts, sizes, np.cumsum(sizes))

    @property
    def data_dir(self):
        return os.path.dirname(os.path.dirname(self.class_dirs[0]))

    # ----- epochs and sharding -----
    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def shard(self, rank, world_size):
        """Keep, of every batch of batch_size tasks, this rank's contiguous slice.

        One data-parallel step over world_size ranks then sees exactly the
        tasks of one single-process step. Returns self.
        """
        if not (checks.is_int(world_size) and world_size >= 1 and checks.is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"shard: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if self.batch_size % world_size:
            raise checks.error(self._config, self._batch_key,
                               f"{self.batch_size} tasks per batch cannot be split evenly over "
                               f"{world_size} ranks; use a multiple of {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_batches = -(-self.tasks_per_epoch // self.batch_size)
        self.num_tasks = sum(hi - lo for lo, hi in self._slices())
        return self

    def _slices(self):
        """[lo, hi) task numbers of this rank, one slice per batch."""
        for start in range(0, self.tasks_per_epoch, self.batch_size):
            size = min(self.batch_size, self.tasks_per_epoch - start)  # last may be partial
            yield (start + self.rank * size // self.world_size,
                   start + (self.rank + 1) * size // self.world_size)

    def __len__(self):
        # Tasks this rank yields per epoch. paddle's IterableDataset.__len__
        # raises RuntimeError, which breaks list(dataset) and length hints.
        return self.num_tasks

    def __iter__(self):
        worker = paddle.io.get_worker_info()
        for b, (lo, hi) in enumerate(self._slices()):
            # DataLoader workers split whole batches so batches stay consecutive tasks.
            if worker is not None and b % worker.num_workers != worker.id:
                continue
            for i in range(lo, hi):
                yield self.task(self.epoch, i)

    # ----- episodes -----
    def episode(self, epoch, index):
        """Which images/classes task `index` of `epoch` uses (no pixels)."""
        rng = np.random.default_rng([self.seed, self._mode_id, int(epoch), int(index)])
        if self._pools is None:
            classes = rng.choice(self.num_classes, self.n_way, replace=False)
        else:
            classes = self._within_alphabet_classes(rng)
        labels = rng.permutation(self.n_way)  # class j of the episode gets labels[j]
        per_class = ROTATIONS if self.rotations else 1
        spt, qry = [], []
        for cls in classes:
            char = cls // per_class
            # one draw without replacement keeps support and query disjoint
            picks = rng.choice(self._count[char], self.k_spt + self.k_query, replace=False)
            picks = picks + self._start[char]
            spt.append(picks[:self.k_spt])
            qry.append(picks[self.k_spt:])
        spt_order = rng.permutation(self.n_way * self.k_spt)
        qry_order = rng.permutation(self.n_way * self.k_query)
        spt_cls = np.repeat(classes, self.k_spt)[spt_order]
        qry_cls = np.repeat(classes, self.k_query)[qry_order]
        return Episode(
            np.concatenate(spt)[spt_order], spt_cls,
            np.repeat(labels, self.k_spt)[spt_order].astype(np.int64),
            np.concatenate(qry)[qry_order], qry_cls,
            np.repeat(labels, self.k_query)[qry_order].astype(np.int64))

    def _within_alphabet_classes(self, rng):
        """n_way distinct classes of one alphabet, drawn from `rng` (the task's own generator).

        The alphabet is the one a class drawn uniformly from all sampled classes belongs to: an alphabet is chosen
        with probability proportional to its classes. Every class then takes part in tasks equally often
        (n_way / all classes per task), as with "any"; choosing alphabets uniformly would show each of Angelic's
        20 characters 2.35x as often as each of Malayalam's 47, and the mean accuracy would weigh alphabets, not
        characters, alike. Integer draws only, no floating-point probabilities, so a task is the same on every
        machine.
        """
        pools = self._pools
        alphabet = int(np.searchsorted(pools.ends, rng.integers(pools.ends[-1]), side="right"))
        return pools.starts[alphabet] + rng.choice(pools.sizes[alphabet], self.n_way, replace=False)

    def task(self, epoch, index):
        """[x_spt, y_spt, x_qry, y_qry] of task `index` of `epoch` as numpy arrays."""
        ep = self.episode(epoch, index)
        key = [self.seed, self._mode_id, int(epoch), int(index)]
        x_spt, x_qry = self._drawings(ep.spt_images, ep.spt_classes), self._drawings(ep.qry_images, ep.qry_classes)
        y_spt = ep.y_spt
        if self.support_copies:
            copies, y_copies = with_copies(x_spt, y_spt, self.support_copies, self.copy_distortion,
                                           np.random.default_rng(key + [COPY_SHIFT_STREAM]),
                                           np.random.default_rng(key + [COPY_AFFINE_STREAM]))
        if any(self.distortion):
            shifts, affine = np.random.default_rng(key + [_SHIFT_STREAM]), np.random.default_rng(key + [_AFFINE_STREAM])
            x_spt = distorted(x_spt, self.distortion, shifts, affine)
            x_qry = distorted(x_qry, self.distortion, shifts, affine)
        if self.support_copies:
            x_spt, y_spt = np.concatenate([x_spt, copies]), np.concatenate([y_spt, y_copies])
        return [to_network_input(x_spt), y_spt, to_network_input(x_qry), ep.y_qry]

    def _drawings(self, images, classes):
        """uint8 [n, H, W]: the images, each turned as its class says (rotations)."""
        x = self._images[images]  # a copy
        if self.rotations:
            turns = classes % ROTATIONS
            for k in range(1, ROTATIONS):
                if (turns == k).any():
                    x[turns == k] = np.rot90(x[turns == k], k, axes=(1, 2))
        return x


def with_copies(images, labels, copies, ranges, shifts, affine):
    """(uint8 images [n * copies, H, W], their labels): `copies` copies of each of the images, each distorted at
    random within `ranges` (a Distortion) from the generators `shifts` and `affine`; image i's copies first."""
    images = np.repeat(images, copies, axis=0)
    return distorted(images, ranges, shifts, affine), np.repeat(np.asarray(labels), copies)


def distorted(x, ranges, shifts, affine):
    """uint8 images [n, H, W], each distorted at random within `ranges` (a Distortion), drawn from two generators:
    the pixel offsets from `shifts`, the turn, shear and scale from `affine`."""
    offsets = shifts.integers(-ranges.shift, ranges.shift + 1, size=(len(x), 2))
    if not (ranges.rotate or ranges.shear or ranges.scale):
        return shifted(x, offsets)  # whole pixels, copied as they are: no resampling
    # Five draws per image whatever is on, so turning one distortion on leaves the others' draws as they were.
    u = affine.uniform(-1.0, 1.0, size=(len(x), 5))
    return affine_distorted(x, u[:, 0] * ranges.rotate, u[:, 1:3] * ranges.shear, 1.0 + u[:, 3:5] * ranges.scale,
                            offsets)


def shifted(images, offsets):
    """uint8 images [n, H, W], image i moved offsets[i] = (down, right) pixels (negative: up, left); the uncovered
    edge is paper and what leaves the frame is lost."""
    _, height, width = images.shape
    pad = int(np.abs(offsets).max(initial=0))
    framed = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), constant_values=PAPER)
    out = np.empty_like(images)
    for i, (down, right) in enumerate(offsets):
        out[i] = framed[i, pad - down:pad - down + height, pad - right:pad - right + width]
    return out


def affine_distorted(images, angle, shear, scale, offsets):
    """uint8 images [n, H, W], image i turned counter-clockwise by angle[i] degrees, sheared by shear[i] = (along x,
    along y) degrees and scaled by the factors scale[i] = (x, y), all about the image centre, then moved
    offsets[i] = (down, right) pixels. Bilinear; paper where no part of the image lands."""
    n, height, width = images.shape
    angle, shear = np.radians(angle).reshape(n), np.radians(shear).reshape(n, 2)
    scale, offsets = np.asarray(scale, dtype=np.float64).reshape(n, 2), np.asarray(offsets).reshape(n, 2)
    centre = np.array([width / 2.0, height / 2.0])  # PIL's coordinates: pixel (0, 0) covers [0, 1) x [0, 1)
    out = np.empty_like(images)
    for i in range(n):
        cos, sin = np.cos(angle[i]), np.sin(angle[i])
        turn = np.array([[cos, sin], [-sin, cos]])  # counter-clockwise on screen, where y points down
        slant = np.array([[1.0, np.tan(shear[i, 0])], [np.tan(shear[i, 1]), 1.0]])
        forward = turn @ slant @ np.diag(scale[i])  # (x, y) offsets from the centre, input -> output
        # PIL asks, for every output pixel, where in the input to read: the inverse map.
        inverse = np.linalg.inv(forward)
        origin = centre - inverse @ (centre + offsets[i, ::-1])
        coefficients = (*inverse[0], origin[0], *inverse[1], origin[1])
        image = Image.fromarray(images[i])
        out[i] = np.asarray(image.transform((width, height), Image.AFFINE, coefficients, resample=Image.BILINEAR,
                                            fillcolor=PAPER))
    return out


def to_network_input(images):
    """uint8 grayscale images [n, H, W] (decode_image's) as the network's input: float32 [n, 1, H, W]."""
    # PaddleRec's normalisation: ink (0) -> -1, paper (255) -> 1
    return (np.asarray(images).astype(np.float32) / 255.0 * 2.0 - 1.0)[:, None]


# ----- scanning the tree -----
def _visible(entry):
    return not entry.name.startswith(".")


def _unreadable(config, path, exc):
    """One line naming the path of a folder or link the tree cannot be read through (a symlink loop, a
    folder without read permission) instead of a traceback from deep inside the scan."""
    return checks.error(config, path, f"cannot read this part of the data tree ({exc.strerror or exc})")


def _is_folder(path, config):
    """os.path.isdir, except that a symlink loop or an unreadable path is an error, not "no folder"."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:  # a dangling link: not a folder, skipped like a stray file
        return False
    except OSError as exc:
        raise _unreadable(config, path, exc) from None


def _visible_entries(folder, config):
    """(path, is_dir, is_file) of the visible entries of `folder`, sorted by name. DirEntry.is_dir/is_file
    raise on a symlink loop (they only swallow a missing target), so they are asked here too."""
    try:
        with os.scandir(folder) as entries:
            listing = [(e.name, e.path, e.is_dir(), e.is_file()) for e in entries if _visible(e)]
    except OSError as exc:
        raise _unreadable(config, exc.filename or folder, exc) from None
    return [item[1:] for item in sorted(listing)]


def _special(path, is_dir, config):
    """False for a folder or a dangling link named like an image (skipped like stray files); an error naming
    a FIFO, device or socket, which reading would block on or misread, rather than skipping it unseen."""
    if is_dir or not os.path.exists(path):
        return False
    raise checks.error(config, path, NOT_REGULAR)


def _scan(file_list, config, mode):
    """Sorted class folders and their images; (class_dirs, paths, starts, counts, groups), groups = one
    (path, first character, characters) per group (alphabet) with at least one character folder."""
    class_dirs, paths, starts, counts, groups = [], [], [], [], []
    for group in sorted(file_list):
        if os.path.basename(group).startswith(".") or not _is_folder(group, config):
            continue
        first = len(class_dirs)
        for char_path, is_dir, _ in _visible_entries(group, config):
            if not is_dir:
                continue
            images = [path for path, is_sub, is_file in _visible_entries(char_path, config)
                      if path.lower().endswith(IMAGE_EXTS) and (is_file or _special(path, is_sub, config))]
            class_dirs.append(char_path)
            starts.append(len(paths))
            counts.append(len(images))
            paths.extend(images)
        if len(class_dirs) > first:
            groups.append((group, first, len(class_dirs) - first))
    if not class_dirs:
        if file_list:
            where = os.path.dirname(os.path.abspath(sorted(file_list)[0]))
        else:
            where = "runner.train_data_dir" if mode == "train" else "runner.test_data_dir"
        raise checks.error(config, where, "no character folders found (expected "
                     "<data_dir>/<group>/<character>/<image>.png; see datasets/omniglot/readme.md)")
    return class_dirs, paths, starts, counts, groups


_warned = set()


def _warn_once(message):
    """A warning line, once per process: the trainer builds the dataset again for every epoch and validation.

    Through the tools' logger (tools/utils/console.py), so it reads like their warnings; without the tools
    loaded, Python's last-resort handler still prints it on stderr.
    """
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("paddle_maml_tools").warning(message)


# ----- decoding and the decode cache -----
def decode_image(path, size, config):
    """One image file as uint8 grayscale [size, size] (resized with RESAMPLE), ink dark on light paper, whatever
    mode the file stores (see _grey); a one-line error naming it when it is not a readable image file."""
    try:
        # O_NONBLOCK: a FIFO opens at once (to be refused below) instead of waiting for a writer for ever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise checks.error(config, path, f"cannot decode image ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise checks.error(config, path, NOT_REGULAR)
        try:
            with Image.open(file) as img:
                img = _grey(ImageOps.exif_transpose(img))  # a photo's orientation tag: upright, as viewers show it
                if img.size != (size, size):
                    img = img.resize((size, size), RESAMPLE)
                return np.asarray(img, dtype=np.uint8)
        except Image.UnidentifiedImageError:  # its own text names the file object, not the path
            raise checks.error(config, path, "cannot decode image (no image format PIL reads)") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                Image.DecompressionBombError) as exc:
            raise checks.error(config, path, f"cannot decode image ({exc})") from None


def _grey(img):
    """`img`, in any mode PIL opens, as 8-bit grey ("L"). Transparent pixels are paper: an image with an alpha
    channel or a transparent colour is laid on white, so dark ink on a transparent background reads as ink on
    paper (dropping the alpha would show the background's hidden colour, often black). 16-bit grey is scaled to
    8 bits (PIL's own conversion clips it, and all but the darkest ink turns white)."""
    if img.mode in WIDE_GREY_MODES:
        wide = np.asarray(img).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"grey levels {wide.min()}..{wide.max()} outside the 16-bit range 0..65535")
        key = img.info.get("transparency")
        if checks.is_int(key):  # a grey level the file marks as transparent: paper
            wide[wide == key] = 65535
        # round(v * 255 / 65535): an 8-bit level x stored as 16 bits (x * 257) comes back as x exactly
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no defined paper and ink levels; save it as an 8- or 16-bit "
                         "image")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        grey = Image.alpha_composite(Image.new("RGBA", img.size, (PAPER, PAPER, PAPER, 255)), rgba).convert("L")
        (low, high), (clear, opaque) = grey.getextrema(), rgba.getchannel("A").getextrema()
        if low == high and clear != opaque:  # a drawing only the transparency shows, on white it is gone
            raise ValueError("light ink on a transparent background: on white paper nothing of it shows; "
                             "save it with dark ink")
        return grey
    if img.mode in ("1", "L", "P", "RGB"):  # PIL's own conversion, as before (an Omniglot PNG is mode "1")
        return img.convert("L")
    return img.convert("RGB").convert("L")  # CMYK, YCbCr, ...: through RGB, which every mode converts to


def _fingerprint(data_dir, paths, size):
    """Changes whenever an image is added, removed, renamed or rewritten."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size} {RESAMPLE}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, data_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_candidates(data_dir, size):
    """Next to the data first; a per-user cache when that folder is not writable."""
    data_dir = os.path.abspath(data_dir)
    name = f"{os.path.basename(data_dir)}-{size}px.npz"
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(data_dir.encode()).hexdigest()[:12]
    return [os.path.join(os.path.dirname(data_dir), ".cache", name),
            os.path.join(user, "paddlerec_maml", f"{tag}-{name}")]


def _read_cache(path, fingerprint):
    if not os.path.isfile(path):  # missing, or a FIFO there, which loading would wait on for ever
        return None
    try:
        with np.load(path) as cached:
            if str(cached["fingerprint"]) == fingerprint:
                return cached["images"]
    except Exception:  # missing, truncated or foreign file: just rebuild
        return None
    return None


def _write_cache(path, fingerprint, images):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), images=images)
        os.replace(tmp, path)  # readers never see a half-written cache
        return True
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def available_memory():
    """Bytes of memory the system can still give a process (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(config, count, size):
    """Refuse, before decoding, an image array that would not fit in memory (it would end in the OOM killer)."""
    needed, available = count * size * size, available_memory()
    if available is not None and needed > available:
        raise checks.error(config, "hyper_parameters.imgsize",
                           f"{count} images of {size}x{size} pixels need {needed / 2 ** 20:.1f} MiB decoded, more than "
                           f"the {available / 2 ** 20:.1f} MiB of memory available; use a smaller imgsize")


def _load_images(data_dir, paths, size, config):
    """uint8 [N, size, size] of all images; (images, cache_path, cache_status)."""
    _check_memory(config, len(paths), size)
    fingerprint = _fingerprint(data_dir, paths, size)
    candidates = _cache_candidates(data_dir, size)
    for path in candidates:
        images = _read_cache(path, fingerprint)
        if images is not None:
            return images, path, "loaded"
    images = np.empty((len(paths), size, size), dtype=np.uint8)
    # disable=None: a bar on a terminal only; in a log file its carriage returns would garble the lines after it.
    for i, path in enumerate(tqdm(paths, desc=f"decoding {os.path.basename(data_dir)}",
                                  unit="img", leave=False, disable=None)):
        images[i] = decode_image(path, size, config)
    for path in candidates:
        if _write_cache(path, fingerprint, images):
            return images, path, "built"
    return images, None, "disabled"
