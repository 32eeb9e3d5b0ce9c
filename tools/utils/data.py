"""Building a DataLoader from the reader module a config names.

Reader contract (PaddleRec's): the module defines
`class RecDataset(paddle.io.IterableDataset)` built as
`RecDataset(file_list, config)`, plus `mode=` when its constructor takes it.
Optional hook `set_epoch(epoch)` is called when the dataset defines it;
`shard(rank, world_size)` is called in data-parallel runs, which need it.

Validation ("valid") uses the evaluation reader and batch size on
runner.valid_data_dir. The reader gets mode="valid" only if RecDataset
declares it in a MODES attribute (e.g. MODES = ("train", "infer", "valid"));
otherwise mode="infer", since older readers know only train and infer.

The loader is guarded: with num_workers=0 Paddle still reads the dataset in a
background thread. An exception there (a reader bug, a bad file, a hostile
setting) ends only that thread, prints its traceback, and leaves the main
thread waiting for a batch for ever. Here the reader and the collate step run
under a guard that keeps the first exception and ends the stream cleanly; the
loader's iterator then raises it in the main thread as one UserError line, so
the tool exits.
"""
import functools
import inspect
import math
import os
import traceback

from tools.utils.console import UserError
from tools.utils.plugin import import_from_config_folder

# mode -> (data dir key, batch size key, reader key)
MODE_KEYS = {
    "train": ("runner.train_data_dir", "runner.train_batch_size", "runner.train_reader_path"),
    "infer": ("runner.test_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
    "valid": ("runner.valid_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
}


def reader_mode(dataset_class, mode):
    """The mode= a RecDataset is built with: "valid" falls back to "infer"
    unless the class lists "valid" in its MODES attribute."""
    if mode == "valid" and "valid" not in tuple(getattr(dataset_class, "MODES", ())):
        return "infer"
    return mode


def list_data_files(config, dir_key):
    """Sorted absolute paths of the entries of the data dir in `dir_key`.

    Hidden entries (.gitkeep, .DS_Store) are skipped: a folder holding only
    those is treated as empty.
    """
    folder = config.resolve_path(dir_key)
    if not os.path.exists(folder):
        raise config.error(dir_key, f"data folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise config.error(dir_key, f"{folder} is not a folder")
    try:
        entries = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    except OSError as reason:  # no read permission, or the folder vanished
        raise config.error(dir_key, f"cannot read data folder {folder}: {reason.strerror}") from None
    if not entries:
        raise config.error(dir_key, f"data folder {folder} is empty")
    return [os.path.join(folder, name) for name in entries]


def create_dataset(config, mode, rank=0, world_size=1, epoch=0):
    """The reader's RecDataset for `mode`, with its optional hooks applied."""
    if mode not in MODE_KEYS:
        raise ValueError(f"mode must be one of {sorted(MODE_KEYS)}, got {mode!r}")
    dir_key, _, reader_key = MODE_KEYS[mode]
    file_list = list_data_files(config, dir_key)
    reader = import_from_config_folder(config, reader_key)
    dataset_class = getattr(reader, "RecDataset", None)
    if dataset_class is None:
        raise config.error(reader_key, f"{reader.__file__} defines no class RecDataset")
    if "mode" in inspect.signature(dataset_class).parameters:
        dataset = dataset_class(file_list, config, mode=reader_mode(dataset_class, mode))
    else:
        dataset = dataset_class(file_list, config)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    # Sharding only means something with several ranks; single-process
    # runs leave readers untouched.
    if world_size > 1:
        if not callable(getattr(dataset, "shard", None)):
            raise config.error(reader_key, f"{dataset_class.__module__}.RecDataset has no shard(rank, world_size) "
                               "method: every rank would read the same samples, so data-parallel runs need one")
        dataset.shard(rank, world_size)
    return dataset


def loader_batch_size(config, mode, world_size=1) -> int:
    """Samples per loader batch on one rank: runner.*_batch_size / world_size.

    The configured batch size is the global one (what one optimizer step
    sees); it must split evenly over the ranks.
    """
    _, batch_key, _ = MODE_KEYS.get(mode, (None, None, None))
    if batch_key is None:
        raise ValueError(f"mode must be one of {sorted(MODE_KEYS)}, got {mode!r}")
    batch_size = config.require(batch_key, int)
    if batch_size < 1:
        raise config.error(batch_key, f"must be at least 1, got {batch_size}")
    if batch_size % world_size:
        raise config.error(batch_key, f"{batch_size} cannot be split evenly over {world_size} data-parallel "
                           f"ranks; use a multiple of {world_size}")
    return batch_size // world_size


def create_data_loader(config, mode, rank=0, world_size=1, epoch=0):
    """A paddle.io.DataLoader over the reader's RecDataset for `mode`.

    With world_size > 1 the reader keeps this rank's share (shard hook) and
    the loader's batch size is runner.*_batch_size / world_size.
    """
    batch_size = loader_batch_size(config, mode, world_size)
    dataset = create_dataset(config, mode, rank, world_size, epoch)
    # num_workers=0: readers generate episodes from seeded generators, and
    # worker processes would make the order depend on scheduling. Guarded: an
    # error in Paddle's reading thread ends the run instead of hanging it.
    return guarded_loader_class()(dataset, f"{config.path}: {MODE_KEYS[mode][2]}", batch_size=batch_size,
                             num_workers=0, return_list=True, drop_last=False)


@functools.lru_cache(maxsize=None)
def guarded_loader_class():
    """GuardedDataLoader: a paddle.io.DataLoader over an IterableDataset that re-raises the reader's errors
    in the main thread; `label` (config file and reader key) starts them. Built on first use, so that
    importing this module does not import paddle (the environment is prepared first)."""
    import paddle
    from paddle.io.dataloader.collate import default_collate_fn

    class _GuardedDataset(paddle.io.IterableDataset):
        """Iterates the reader's dataset, keeping its first exception instead of letting it kill the thread."""

        def __init__(self, dataset):
            super().__init__()
            self.dataset, self.error = dataset, None

        def __iter__(self):
            try:
                yield from self.dataset
            except Exception as error:  # noqa: BLE001  (re-raised in the main thread by GuardedDataLoader)
                self.error = self.error or error

        def collate(self, samples):
            try:
                return default_collate_fn(samples)
            except Exception as error:  # noqa: BLE001
                self.error = self.error or error
                return None  # Paddle's reading thread ends the stream on a None batch

        def __len__(self):
            return len(self.dataset)

        def __getattr__(self, name):  # the reader's own hints (num_batches) stay visible to the tools
            if name == "dataset":
                raise AttributeError(name)
            return getattr(self.dataset, name)

    class GuardedDataLoader(paddle.io.DataLoader):
        """paddle.io.DataLoader over an IterableDataset; `label` (config file and reader key) starts its errors."""

        def __init__(self, dataset, label, **options):
            self.guard, self.label = _GuardedDataset(dataset), label
            super().__init__(self.guard, collate_fn=self.guard.collate, **options)

        def __iter__(self):
            self.guard.error = None
            yield from super().__iter__()
            error = self.guard.error
            if isinstance(error, UserError):
                raise error
            if error is not None:
                frame = traceback.extract_tb(error.__traceback__)[-1]
                raise UserError(f"{self.label}: the reader failed: {type(error).__name__}: {error} "
                                f"({os.path.basename(frame.filename)}, line {frame.lineno})") from None

    return GuardedDataLoader


def batches_then_none(loader):
    """The loader's batches, then None for ever.

    Data-parallel ranks keep stepping together after their own batches run
    out (to learn that the others are done too); a finished paddle DataLoader
    iterator must not be asked again (it raises std::future_error).
    """
    yield from loader
    while True:
        yield None


def expected_batches(loader):
    """Number of batches the loader will give, or None when unknown.

    Uses len(dataset) when the dataset has one, else a `num_batches`
    attribute or method the reader may offer as a hint.
    """
    dataset = loader.dataset
    hint = getattr(dataset, "num_batches", None)
    if callable(hint):
        hint = hint()
    if isinstance(hint, int):
        return hint
    try:
        return math.ceil(len(dataset) / loader.batch_size)
    except (TypeError, AttributeError, NotImplementedError, ZeroDivisionError):
        return None


def count_samples(batch, fallback):
    """Leading size of the first tensor in a batch (PaddleRec's batch size)."""
    items = batch.values() if isinstance(batch, dict) else batch
    if hasattr(items, "shape"):
        items = [items]
    for item in items:
        shape = getattr(item, "shape", None)
        if shape:
            return int(shape[0])
    return fallback
