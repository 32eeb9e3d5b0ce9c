"""Reader of the toy plugin: samples points around the blob centers it reads.

The data files only describe the blobs (label,center_x,center_y,spread);
points are drawn from a generator seeded by (runner.seed, mode, epoch), so
every run, and every resumed run, sees exactly the same samples.

Test hook (tests/test_distributed.py): TOY_FAULT=RANK:exit makes that data-parallel rank die abruptly in the
gradient all-reduce of its first training batch, while the other ranks wait for it there; TOY_FAULT=RANK:hang
makes it stall while its training data is built (before the first epoch's barrier). The tools themselves hold
no fault injection.
"""
import csv
import os
import sys
import time

import numpy as np
import paddle

_MODE_STREAM = {"train": 0, "infer": 1}
_COLUMNS = ["label", "center_x", "center_y", "spread"]


def read_blobs(path, config):
    """[(label, (x, y), spread)] from one CSV; config.error on a bad row."""
    blobs = []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        if next(rows, None) != _COLUMNS:
            raise config.error(path, f"line 1: expected header {','.join(_COLUMNS)}")
        for line_number, row in enumerate(rows, start=2):
            try:
                label, x, y, spread = int(row[0]), float(row[1]), float(row[2]), float(row[3])
            except (ValueError, IndexError):
                raise config.error(path, f"line {line_number}: expected {','.join(_COLUMNS)}") from None
            blobs.append((label, (x, y), spread))
    return blobs


def _die_in_the_gradient_all_reduce():
    """Make this rank exit abruptly once the other ranks wait for it in the gradient all-reduce. Dying at once
    would race Paddle's launcher, which SIGTERMs the other ranks within about a second: a rank slowed down by a
    loaded machine could be stopped before it reached the collective, and never report the failure."""
    from paddle.distributed.fleet.utils import hybrid_parallel_util

    def die(*args, **kwargs):
        time.sleep(2)  # the ranks went through the sample counts' all-reduce together: the others are in this one
        os._exit(17)

    hybrid_parallel_util.fused_allreduce_gradients_with_group = die


class RecDataset(paddle.io.IterableDataset):
    def __init__(self, file_list, config, mode="train"):
        super().__init__()
        self.blobs = [blob for path in file_list for blob in read_blobs(path, config)]
        if not self.blobs:
            raise config.error(file_list[0], "no blobs defined")
        count_key = "runner.tasks_per_epoch" if mode == "train" else "runner.infer_tasks"
        self.num_samples = config.get(count_key) or 256
        self.seed = config.get("runner.seed", 0)
        self.stream = _MODE_STREAM[mode]
        self.training = mode == "train"
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def set_epoch(self, epoch):
        # Evaluation uses the same points for every checkpoint.
        self.epoch = epoch if self.stream == _MODE_STREAM["train"] else 0

    def shard(self, rank, world_size):
        self.rank, self.world_size = rank, world_size
        self._inject_fault("hang")

    def _inject_fault(self, kind):
        if self.training and os.environ.get("TOY_FAULT") == f"{self.rank}:{kind}":
            print(f"TOY_FAULT={self.rank}:{kind} (test)", file=sys.stderr, flush=True)
            if kind == "exit":
                _die_in_the_gradient_all_reduce()
            else:
                time.sleep(3600)

    def __len__(self):
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self):
        self._inject_fault("exit")
        rng = np.random.default_rng([self.seed, self.stream, self.epoch])
        choices = rng.integers(len(self.blobs), size=self.num_samples)
        noise = rng.standard_normal((self.num_samples, 2))
        for index in range(self.rank, self.num_samples, self.world_size):
            label, center, spread = self.blobs[choices[index]]
            point = np.asarray(center) + spread * noise[index]
            yield [point.astype("float32"), np.array([label], dtype="int64")]
