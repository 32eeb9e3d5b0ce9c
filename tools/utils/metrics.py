"""The numbers of a run: plain values from tensors and metrics, the metrics file (JSON lines, doc/tools.md),
VisualDL scalars, and NumericGuard, which stops training at its first NaN or infinite number."""
import io
import json
import math
import numbers
import os
import time

from tools.utils.checkpoint import json_safe, read_file
from tools.utils.config import is_number
from tools.utils.console import UserError


def to_scalar(value):
    """A Python bool, int or float from a number, or a one-element array or tensor."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        if getattr(value, "size", 1) != 1:  # tensors and arrays; a tensor's .size is its element count too
            raise TypeError(f"expected a single number, got an array of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, bool):
        return value
    if not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def scalar_dict(values) -> dict:
    return {str(key): to_scalar(value) for key, value in (values or {}).items()}


def metric_results(metrics, names) -> dict:
    """{key: number} from each metric's details() if it has one, else accumulate() (doc/tools.md)."""
    results = {}
    for metric, name in zip(metrics, names):
        value = metric.details() if callable(getattr(metric, "details", None)) else metric.accumulate()
        if isinstance(value, dict):
            results.update({key if key not in results else f"{name}.{key}": to_scalar(item)
                            for key, item in value.items()})
        else:  # paddle.metric.Accuracy gives [acc]
            results[name] = to_scalar(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value)
    return results


class MetricsLog:
    """Event records appended in one write each, so the file stays readable while a run goes on; None: nothing."""

    def __init__(self, path, append=False):
        self.path, self._handle = path, None
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # Unbuffered: nothing is left in a buffer to fail again at exit when the disk is full.
            self._handle = open(path, "ab" if append else "wb", buffering=0)
        except OSError as reason:
            raise UserError(f"{path}: cannot open metrics file: {reason.strerror}") from None

    def write(self, event, fields, extra=None):
        """`fields`, then the `extra` whose keys are free (a plugin's value cannot replace "epoch")."""
        if self._handle is None:
            return
        record = {"event": event, **fields}
        for key, value in {**(extra or {}), "timestamp": round(time.time(), 3)}.items():
            record.setdefault(key, value)
        line = memoryview((json.dumps(json_safe(record)) + "\n").encode("utf-8"))
        try:
            while line:
                line = line[self._handle.write(line):]
        except OSError as reason:  # a full disk, a quota, a vanished network share
            raise UserError(f"{self.path}: cannot write metrics: {reason.strerror}") from None

    def close(self):
        if self._handle is not None:
            self._handle.close()


def read_metrics(path) -> list:
    """All records of a metrics file but an unfinished last line; a UserError naming the file and line."""
    try:
        lines = io.StringIO(read_file(path, "metrics file").decode("utf-8")).readlines()  # split at \n only
    except UnicodeDecodeError as reason:
        raise UserError(f"{path}: cannot read metrics file: {reason}") from None
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
    """runner.use_visual: the scalars of one phase ("train" or "infer") where PaddleRec writes them; else nothing."""

    def __init__(self, config, phase, is_main=True):
        self.writer, self.phase = None, phase
        if not (config.get("runner.use_visual") and is_main):
            return
        try:
            from visualdl import LogWriter
        except ImportError:
            raise config.error("runner.use_visual", 'needs the optional package visualdl: pip install -e ".[visual]" '
                               "(or pip install visualdl)") from None
        self.writer = LogWriter(logdir=os.path.join(config.config_dir, "visualDL_log", phase))

    def add(self, values, step):
        for key, value in values.items() if self.writer else ():
            if is_number(value):
                self.writer.add_scalar(tag=f"{self.phase}/{key}", step=int(step), value=float(value))

    def close(self):
        if self.writer:
            self.writer.close()


class NonFiniteError(UserError):
    """Training produced a NaN or infinite value."""


def _first_non_finite(named_tensors):
    """The name of the first tensor with a NaN or infinite element, or None, in one host sync: t * 0 is 0 for a
    finite element and NaN otherwise, so its sum cannot overflow into a false alarm as a norm could."""
    import paddle

    def finite(tensors):
        return not tensors or math.isfinite(float(paddle.add_n([(t * 0).sum().astype("float32") for t in tensors])))

    if finite([tensor for _, tensor in named_tensors]):
        return None
    return next((name for name, tensor in named_tensors if not finite([tensor])), "?")


def likely_causes(config, keys) -> str:
    if not keys:
        return "check the learning rate(s) and the data"
    return "check " + " and ".join(f"{key} ({what}, now {config.get(key)!r})" for key, what in keys.items())


class NumericGuard:
    """Stops training at its first non-finite number, before an update spreads it into parameters and checkpoint."""

    GROWTH_WARNING = 1e4  # a loss this many times its first is still finite, but diverging: one warning

    def __init__(self, causes, warn):
        self.causes, self.warn, self.first_loss, self.warned = causes, warn, None, False

    def check_batch(self, loss_value, model, epoch, batch_id):
        """After the gradients are final (data-parallel: all-reduced, so ranks agree), before the step."""
        where = f"epoch {epoch}, batch {batch_id}"
        stopped = f"training stopped before this update, nothing of epoch {epoch} saved; {self.causes}"
        if not math.isfinite(loss_value):
            raise NonFiniteError(f"{where}: the loss is {loss_value}; {stopped}")
        bad = _first_non_finite([(name, p.grad) for name, p in model.named_parameters() if p.grad is not None])
        if bad is not None:
            raise NonFiniteError(f"{where}: the gradient of {bad} is not finite (loss {loss_value:.4g}); {stopped}")
        if self.first_loss is None:
            self.first_loss = abs(loss_value)
        elif not self.warned and abs(loss_value) > self.GROWTH_WARNING * max(self.first_loss, 1e-12):
            self.warned = True
            self.warn(f"{where}: the loss is {loss_value:.4g}, up from {self.first_loss:.4g} at the run's first "
                      f"batch: training may be diverging; {self.causes}")

    def check_parameters(self, model, epoch):
        """Before saving: finite but huge gradients in the epoch's last batch can still overflow a parameter."""
        bad = _first_non_finite([(name, value) for name, value in model.state_dict().items()
                                 if hasattr(value, "dtype") and "float" in str(value.dtype)])
        if bad is not None:
            raise NonFiniteError(f"epoch {epoch}: parameter {bad} is not finite after the epoch's updates; "
                                 f"its checkpoint is not written; {self.causes}")
