"""A DataLoader over the RecDataset of the reader module a config names (doc/tools.md, "Plugin contract")."""
import functools
import inspect
import itertools
import math
import os
import traceback

from tools.utils.console import UserError
from tools.utils.plugin import import_from_config_folder

# mode -> (data folder key, batch size key, reader key); validation reads its folder with the evaluation reader.
MODE_KEYS = {
    "train": ("runner.train_data_dir", "runner.train_batch_size", "runner.train_reader_path"),
    "infer": ("runner.test_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
    "valid": ("runner.valid_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
}


def list_data_files(config, dir_key):
    """Sorted absolute paths of the data folder's entries, hidden ones (.gitkeep) left out."""
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
    """RecDataset(file_list, config[, mode=]) ("valid" only if it lists it in MODES, else "infer"), with its optional
    hooks set_epoch(epoch) and shard(rank, world_size) (which data-parallel runs need) applied."""
    dir_key, _, reader_key = MODE_KEYS[mode]
    file_list = list_data_files(config, dir_key)
    reader = import_from_config_folder(config, reader_key)
    dataset_class = getattr(reader, "RecDataset", None)
    if dataset_class is None:
        raise config.error(reader_key, f"{reader.__file__} defines no class RecDataset")
    if "mode" in inspect.signature(dataset_class).parameters:
        dataset = dataset_class(file_list, config, mode="infer" if mode == "valid" and "valid" not in tuple(
            getattr(dataset_class, "MODES", ())) else mode)
    else:
        dataset = dataset_class(file_list, config)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if world_size > 1:  # single-process runs leave readers untouched
        if not callable(getattr(dataset, "shard", None)):
            raise config.error(reader_key, f"{dataset_class.__module__}.RecDataset has no shard(rank, world_size) "
                               "method: every rank would read the same samples, so data-parallel runs need one")
        dataset.shard(rank, world_size)
    return dataset


def loader_batch_size(config, mode, world_size=1) -> int:
    """Samples per batch of one rank: the configured (global) batch size split evenly over the ranks."""
    batch_key = MODE_KEYS[mode][1]
    batch_size = config.require(batch_key, int, minimum=1)
    if batch_size % world_size:
        raise config.error(batch_key, f"{batch_size} cannot be split evenly over {world_size} data-parallel "
                           f"ranks; use a multiple of {world_size}")
    return batch_size // world_size


def create_data_loader(config, mode, rank=0, world_size=1, epoch=0):
    """A guarded DataLoader over this rank's share of the RecDataset for `mode`; no worker processes, which would
    make the order of the seeded samples depend on scheduling."""
    batch_size = loader_batch_size(config, mode, world_size)
    dataset = create_dataset(config, mode, rank, world_size, epoch)
    return guarded_loader_class()(dataset, f"{config.path}: {MODE_KEYS[mode][2]}", batch_size=batch_size,
                                  num_workers=0, return_list=True, drop_last=False)


@functools.lru_cache(maxsize=None)
def guarded_loader_class():
    """GuardedDataLoader (built on first use: importing this module must not import paddle). Paddle reads an
    IterableDataset in a thread, where an exception (a reader bug, a bad file) ends only that thread and leaves the
    main one waiting for ever; the guard keeps it and ends the stream, and the loader raises it as one UserError."""
    import paddle
    from paddle.io.dataloader.collate import default_collate_fn

    class _GuardedDataset(paddle.io.IterableDataset):
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
    """The loader's batches, then None for ever: data-parallel ranks keep stepping together after their own
    batches run out, and a finished paddle DataLoader iterator must not be asked again (std::future_error)."""
    return itertools.chain(loader, itertools.repeat(None))


def expected_batches(loader):
    """Batches the loader will give (the reader's `num_batches` hint, else from len(dataset)), or None."""
    hint = getattr(loader.dataset, "num_batches", None)
    hint = hint() if callable(hint) else hint
    if isinstance(hint, int):
        return hint
    try:
        return math.ceil(len(loader.dataset) / loader.batch_size)
    except (TypeError, AttributeError, NotImplementedError, ZeroDivisionError):
        return None


def count_samples(batch, fallback):
    """Leading size of the batch's first tensor (PaddleRec's batch size), else `fallback`."""
    items = batch.values() if isinstance(batch, dict) else [batch] if hasattr(batch, "shape") else batch
    return next((int(item.shape[0]) for item in items if getattr(item, "shape", None)), fallback)
