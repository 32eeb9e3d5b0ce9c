"""Metrics of the toy plugin: one returns a dict, one a float.

They cover both shapes of accumulate() result the tools must report, and
define state()/merge_states() so data-parallel runs report over all ranks.
"""
import math


class BlobAccuracy:
    """Accuracy with a 95% normal-approximation confidence half-width."""

    def __init__(self):
        self.reset()

    def name(self):
        return "acc"

    def reset(self):
        self.correct = 0
        self.total = 0

    def update(self, logits, labels):
        predicted = logits.argmax(axis=-1).numpy().reshape(-1)
        expected = labels.numpy().reshape(-1)
        self.correct += int((predicted == expected).sum())
        self.total += int(expected.size)

    def state(self):
        return (self.correct, self.total)

    def merge_states(self, states):
        self.correct = sum(correct for correct, _ in states)
        self.total = sum(total for _, total in states)

    def accumulate(self):
        accuracy = self.correct / self.total if self.total else 0.0
        half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / self.total) if self.total else 0.0
        return {"acc": accuracy, "acc_ci95": half_width, "samples": self.total}


class MeanCrossEntropy:
    """Sample-weighted mean of the batch losses."""

    def __init__(self):
        self.reset()

    def name(self):
        return "xent"

    def reset(self):
        self.loss_sum = 0.0
        self.count = 0

    def update(self, loss, batch_size):
        self.loss_sum += float(loss) * batch_size
        self.count += batch_size

    def state(self):
        return (self.loss_sum, self.count)

    def merge_states(self, states):
        self.loss_sum = sum(loss_sum for loss_sum, _ in states)
        self.count = sum(count for _, count in states)

    def accumulate(self):
        return self.loss_sum / self.count if self.count else 0.0
