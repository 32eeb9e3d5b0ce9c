"""A paddle DataLoader that hands the reader's errors to the main thread.

With num_workers=0 Paddle still reads the dataset in a background thread. An
exception there (a reader bug, a bad file, a hostile setting) ends only that
thread, prints its traceback, and leaves the main thread waiting for a batch
for ever. Here the reader and the collate step run under a guard that keeps
the first exception and ends the stream cleanly; the loader's iterator then
raises it in the main thread as one UserError line, so the tool exits.
Imports paddle: import it only after the environment is prepared.
"""
import os
import traceback

import paddle
from paddle.io.dataloader.collate import default_collate_fn

from tools.utils.errors import UserError


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
