"""The small JSON files of a run (meta.json, best.json): read with limits, written atomically.

These files may come from elsewhere (a shared or copied run folder), so
reading one never trusts it: a size cap, a nesting cap, and every failure is
one UserError line naming the file. The callers check the fields they use.
"""
import json
import math
import os
import tempfile

from tools.utils.errors import UserError

MAX_JSON_BYTES = 4 * 1024 * 1024  # best.json of thousands of validated epochs stays far below
MAX_JSON_DEPTH = 16  # the files nest three or four levels


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(value):
    """JSON has no NaN/Infinity: write null instead (the metrics files do the same)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _depth(value) -> int:
    # Iterative on purpose: a recursive walk of hostile nesting would itself overflow the stack.
    deepest, pending = 0, [(value, 1)]
    while pending:
        value, level = pending.pop()
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH and isinstance(value, (dict, list)):
            pending.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_json_object(path, what) -> dict:
    """The JSON object in `path`; UserError '<path>: corrupt <what> (...)' for anything else."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
    except OSError as reason:
        raise UserError(f"{path}: cannot read {what}: {reason.strerror}") from None
    if len(data) > MAX_JSON_BYTES:
        raise UserError(f"{path}: corrupt {what} (larger than {MAX_JSON_BYTES} bytes)")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UserError(f"{path}: corrupt {what} (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as reason:
        raise UserError(f"{path}: corrupt {what} ({reason})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: corrupt {what} (expected an object, got {type(value).__name__})")
    if _depth(value) > MAX_JSON_DEPTH:
        raise UserError(f"{path}: corrupt {what} (nested more than {MAX_JSON_DEPTH} levels)")
    return value


def is_count(value) -> bool:
    """A non-negative int (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_json_atomically(path, data):
    """Write `data` to `path` through a temporary sibling and a rename: readers see the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as reason:
        raise UserError(f"{path}: cannot write: {reason.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(json_safe(data), handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~umask())
        os.replace(temporary, path)
    except BaseException as reason:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(reason, OSError) and reason.strerror:
            raise UserError(f"{path}: cannot write: {reason.strerror}") from None
        raise
