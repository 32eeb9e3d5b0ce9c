"""The numbers of a run: plain values from tensors and metrics, the metrics file, VisualDL scalars,
per-interval speed, and the guard that stops training at its first non-finite number.

Plugins hand the tools tensors (loss, print_dict values) and metric objects
whose accumulate() returns a float (PaddleRec's contract; a metric may add a
details() method returning a dict with more keys, e.g. a confidence interval)
or a dict of floats; logs and the metrics file need plain Python numbers.

The metrics file is JSON lines: one event object per line, written per line.
Records (all numbers plain JSON numbers; each also has "timestamp"):
  {"event": "start", ...run settings...}
  {"event": "train", "epoch", "batch", "step", "loss", <metrics>, "reader_cost", "batch_cost", "ips"}
  {"event": "epoch", "epoch", "step", "batches", "samples", "seconds", "loss", <metrics>, "checkpoint"}
  {"event": "infer", "epoch", "checkpoint", <metric values>, "batches", "samples", "seconds"}
Writing each line at once keeps the file readable (and plottable) while a run is
still going, and leaves at most one partial line after a crash.

runner.use_visual: VisualDL scalars where PaddleRec's tools write them.
PaddleRec writes <config folder>/visualDL_log/train (tags train/<name>) and
visualDL_log/infer (infer/<name>) at every print interval; so do these tools,
with every logged number (loss, metrics, print_dict values). VisualDL is an
optional extra: pip install -e ".[visual]".

Non-finite numbers: a NaN or infinite loss or gradient (a learning rate far too high, broken data)
poisons every parameter the optimizer step touches, and the epoch's checkpoint would keep it. The
trainer checks each batch's loss and gradients before the optimizer step, and the parameters before
every save (NumericGuard), and stops with one line naming the epoch, the batch and the config keys the
plugin says are the likely cause (its NON_FINITE_KEYS, read by tools.utils.plugin.non_finite_keys; the
tools know no model's keys). The normal path costs one host sync per batch: every gradient is folded
into one scalar that is 0 when all are finite and NaN otherwise; which parameter is at fault is looked
up only after a failure.
"""
import json
import math
import numbers
import os
import time

from tools.utils.checkpoint import json_safe
from tools.utils.config import is_number
from tools.utils.console import UserError


def to_scalar(value):
    """A Python int/float from a number, numpy scalar or one-element tensor."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numpy"):  # paddle.Tensor; avoids importing paddle here
        value = value.numpy()
    if hasattr(value, "size") and hasattr(value, "reshape"):  # numpy array
        if value.size != 1:
            raise TypeError(f"expected a single number, got an array of shape {list(value.shape)}")
        value = value.reshape(-1)[0]
    if hasattr(value, "item"):
        return to_scalar(value.item())
    raise TypeError(f"expected a number, got {type(value).__name__}")


def metric_results(metrics, names) -> dict:
    """{key: number} from each metric's details() if it has one, else its accumulate().

    A float result is stored under the metric's name; a dict result (e.g.
    {"acc": .97, "acc_ci95": .004, "tasks": 1000}) contributes its own keys,
    prefixed with "<name>." only if another metric already used the key.
    """
    results = {}
    for metric, name in zip(metrics, names):
        details = getattr(metric, "details", None)
        value = details() if callable(details) else metric.accumulate()
        if isinstance(value, dict):
            for key, item in value.items():
                results[key if key not in results else f"{name}.{key}"] = to_scalar(item)
        elif isinstance(value, (list, tuple)) and len(value) == 1:
            results[name] = to_scalar(value[0])  # paddle.metric.Accuracy gives [acc]
        else:
            results[name] = to_scalar(value)
    return results


def scalar_dict(values) -> dict:
    """print_dict-like mapping with every value converted by to_scalar."""
    return {str(key): to_scalar(value) for key, value in (values or {}).items()}


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


class MetricsLog:
    """Appends event records to a JSON-lines file; with path None (data-parallel ranks other than 0) writes nothing."""

    def __init__(self, path, append=False):
        self.path, self._handle = path, None
        if path is None:
            return
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            # Unbuffered: each record is one write() that reaches the file at once (nothing is left in a
            # buffer to fail again at exit when the disk is full).
            self._handle = open(path, "ab" if append else "wb", buffering=0)
        except OSError as reason:
            raise UserError(f"{path}: cannot open metrics file: {reason.strerror}") from None

    def write(self, event, fields, extra=None):
        """Append one record: `fields` first, then `extra` entries whose keys
        are not taken (plugin-named values cannot overwrite "epoch" etc.)."""
        if self._handle is None:
            return
        record = {"event": event}
        record.update(fields)
        for key, value in (extra or {}).items():
            record.setdefault(key, value)
        record.setdefault("timestamp", round(time.time(), 3))
        line = memoryview((json.dumps(json_safe(record), sort_keys=False) + "\n").encode("utf-8"))
        try:
            while line:
                line = line[self._handle.write(line):]
        except OSError as reason:  # a full disk, a quota, a vanished network share
            raise UserError(f"{self.path}: cannot write metrics: {reason.strerror}") from None

    def close(self):
        if self._handle is not None:
            self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def read_metrics(path) -> list:
    """All records of a metrics file; UserError naming the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: metrics file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except (OSError, UnicodeDecodeError) as reason:
        raise UserError(f"{path}: cannot read metrics file: {getattr(reason, 'strerror', None) or reason}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            if number == len(lines) and not line.endswith("\n"):
                break  # the unfinished last line of a running or crashed run
            raise UserError(f"{path}: line {number}: not valid JSON") from None
        if not isinstance(record, dict) or "event" not in record:
            raise UserError(f"{path}: line {number}: expected an object with an \"event\" field")
        records.append(record)
    return records


class VisualLog:
    """Scalars of one phase ("train" or "infer") through a visualdl.LogWriter."""

    def __init__(self, writer, phase):
        self.writer, self.phase = writer, phase

    def add(self, values, step):
        for key, value in values.items():
            if is_number(value):
                self.writer.add_scalar(tag=f"{self.phase}/{key}", step=int(step), value=float(value))

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_visual_log(config, phase, is_main=True):
    """A VisualLog when runner.use_visual is on (rank 0 only), else None; a missing visualdl is a UserError."""
    if not config.get("runner.use_visual") or not is_main:
        return None
    try:
        from visualdl import LogWriter
    except ImportError:
        raise config.error("runner.use_visual", 'needs the optional package visualdl: pip install -e ".[visual]" '
                           "(or pip install visualdl)") from None
    return VisualLog(LogWriter(logdir=os.path.join(config.config_dir, "visualDL_log", phase)), phase)


class NonFiniteError(UserError):
    """Training produced a NaN or infinite value; printed as one `error:` line like any UserError."""


def _nan_probe(tensors):
    """A scalar that is 0.0 when every element of `tensors` is finite and NaN otherwise.

    t * 0 is 0 for a finite element and NaN for NaN or +-inf, so the sum is exact: unlike a norm or a
    plain sum, it cannot overflow into a false alarm for large finite values.
    """
    import paddle

    return float(paddle.add_n([(t * 0).sum().astype("float32") for t in tensors]))


def _all_finite(tensors) -> bool:
    return not tensors or math.isfinite(_nan_probe(tensors))


def likely_causes(config, keys) -> str:
    """'check <key> (<what it is>, now <value>) and ...' for the plugin's {key: description}."""
    if not keys:
        return "check the learning rate(s) and the data"
    return "check " + " and ".join(f"{key} ({what}, now {config.get(key)!r})" for key, what in keys.items())


class NumericGuard:
    """The checks of one training run; `causes` ends every error line (see likely_causes)."""

    # A loss this many times its first value in the run is worth one warning: still finite, but a run
    # that diverges (a meta learning rate of 1e6 gives ~1e13) should not go on without a word.
    GROWTH_WARNING = 1e4

    def __init__(self, causes, warn):
        self.causes, self.warn = causes, warn
        self.first_loss = None
        self.warned = False

    def check_batch(self, loss_value, model, epoch, batch_id):
        """Raise NonFiniteError unless this batch's loss and every gradient are finite.

        Call after backward() (and, data-parallel, after the gradient all-reduce, so every rank decides
        alike) and before optimizer.step(): the update that would spread the fault is never applied.
        """
        where = f"epoch {epoch}, batch {batch_id}"
        stopped = f"training stopped before this update, nothing of epoch {epoch} saved; {self.causes}"
        if not math.isfinite(loss_value):
            raise NonFiniteError(f"{where}: the loss is {loss_value}; {stopped}")
        named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        if not _all_finite([grad for _, grad in named]):
            bad = next((name for name, grad in named if not _all_finite([grad])), "?")
            raise NonFiniteError(f"{where}: the gradient of {bad} is not finite (loss {loss_value:.4g}); {stopped}")
        self._watch_growth(loss_value, where)

    def _watch_growth(self, loss_value, where):
        if self.first_loss is None:
            self.first_loss = abs(loss_value)
        elif not self.warned and abs(loss_value) > self.GROWTH_WARNING * max(self.first_loss, 1e-12):
            self.warned = True
            self.warn(f"{where}: the loss is {loss_value:.4g}, up from {self.first_loss:.4g} at the run's first "
                      f"batch: training may be diverging; {self.causes}")

    def check_parameters(self, model, epoch):
        """Raise NonFiniteError if any floating-point parameter or buffer is not finite (call before saving).

        The per-batch checks see the loss and gradients; an update from finite but huge gradients can still
        overflow a parameter in the epoch's last batch, which only this check before the save sees.
        """
        named = [(name, value) for name, value in model.state_dict().items()
                 if hasattr(value, "dtype") and "float" in str(value.dtype)]
        if _all_finite([value for _, value in named]):
            return
        bad = next((name for name, value in named if not _all_finite([value])), "?")
        raise NonFiniteError(f"epoch {epoch}: parameter {bad} is not finite after the epoch's updates; "
                             f"its checkpoint is not written; {self.causes}")
