"""Per-interval speed statistics for PaddleRec-style log lines."""


class IntervalStats:
    """Sums over the batches since the last log line.

    reader_cost is time spent waiting for the loader; batch_cost is the whole
    batch (reading + forward + backward + step), as in PaddleRec's logs.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.batches = 0
        self.samples = 0
        self.reader_seconds = 0.0
        self.batch_seconds = 0.0
        self.loss_sum = 0.0

    def add(self, reader_seconds, batch_seconds, samples, loss):
        self.batches += 1
        self.samples += samples
        self.reader_seconds += reader_seconds
        self.batch_seconds += batch_seconds
        self.loss_sum += loss

    def averages(self) -> dict:
        batches = max(self.batches, 1)
        return {
            "reader_cost": self.reader_seconds / batches,
            "batch_cost": self.batch_seconds / batches,
            "avg_samples": self.samples / batches,
            "ips": self.samples / self.batch_seconds if self.batch_seconds > 0 else 0.0,
        }

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)
