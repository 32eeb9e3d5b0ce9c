"""JSON-lines metrics file: one event object per line, written per line.

Records (all numbers plain JSON numbers; each also has "timestamp"):
  {"event": "start", ...run settings...}
  {"event": "train", "epoch", "batch", "step", "loss", <metrics>, "reader_cost", "batch_cost", "ips"}
  {"event": "epoch", "epoch", "step", "batches", "samples", "seconds", "loss", <metrics>, "checkpoint"}
  {"event": "infer", "epoch", "checkpoint", <metric values>, "batches", "samples", "seconds"}
Writing each line at once keeps the file readable (and plottable) while a run is
still going, and leaves at most one partial line after a crash.
"""
import json
import math
import os
import time

from tools.utils.errors import UserError


def _json_safe(value):
    # JSON has no NaN/Infinity; write null rather than invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends event records to a JSON-lines file."""

    def __init__(self, path, append=False):
        self.path = path
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
        record = {"event": event}
        record.update(fields)
        for key, value in (extra or {}).items():
            record.setdefault(key, value)
        record.setdefault("timestamp", round(time.time(), 3))
        record = {key: _json_safe(value) for key, value in record.items()}
        line = memoryview((json.dumps(record, sort_keys=False) + "\n").encode("utf-8"))
        try:
            while line:
                line = line[self._handle.write(line):]
        except OSError as reason:  # a full disk, a quota, a vanished network share
            raise UserError(f"{self.path}: cannot write metrics: {reason.strerror}") from None

    def close(self):
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class NoMetricsLog:
    """Stands in for MetricsLog on data-parallel ranks other than 0, which write no files."""

    path = None

    def write(self, event, fields, extra=None):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


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
