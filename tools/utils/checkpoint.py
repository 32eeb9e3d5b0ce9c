"""What a run keeps on disk: per-epoch checkpoints, its small JSON files, and its folder.

Checkpoints are in PaddleRec's layout: <save_dir>/<epoch>/rec.pdparams
(model.state_dict()), rec.pdopt (optimizer.state_dict()) and meta.json (epoch,
optimizer class, time, extra). A checkpoint folder either exists complete or
not at all: files are written into a hidden temporary sibling and the folder
is renamed into place, so an interrupted save never leaves a half-written
epoch that a resume would load. The small JSON files (meta.json, best.json,
predict's --json) are written through a temporary sibling and a rename too.

Nothing read back is trusted (a run folder may be shared or copied): the state
dicts are unpickled with only the globals a state dict needs (check_state_pickle),
JSON files with a size and a nesting cap, meta.json field by field, and the
folder's name, not meta.json, says which epoch it is.

The run folder (runner.model_save_path) has one trainer and one run at a time:
- lock_run_folder(): an exclusive flock on <folder>/.trainer.lock, held for
  the life of the process. The file records the holder (pid, host, start) so
  a second trainer can say who has the folder. The kernel drops the lock when
  its process dies however it dies, so a lock file left by a dead trainer is
  simply taken over (and the takeover is reported). A clean exit removes it.
- remove_stale_staging(): the hidden folders and files an interrupted save
  leaves (.<epoch>.saving-*, .<epoch>.old-*, .best.json.*.tmp); only safe
  while holding the lock, since a live trainer's saves look the same.
- replace_old_run(): a fresh start refuses a folder that holds checkpoints
  unless runner.overwrite is set; then the old run's files are first moved
  into one hidden folder, then deleted, so no part of it stays in use.
"""
import atexit
import collections
import fcntl
import io
import json
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import warnings

import numpy as np

from tools.utils.config import is_number
from tools.utils.console import UserError, log, warn

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
    return is_number(value, int) and value >= 0


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


def _latin1_bytes(text, encoding="latin1"):
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"); nothing else is needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


# The functions numpy's own pickles name (numpy.core in numpy 1, numpy._core in numpy 2).
_RECONSTRUCT, _SCALAR = np.zeros(0).__reduce__()[0], np.float32(0).__reduce__()[0]
_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("builtins", "tuple"): tuple, ("__builtin__", "tuple"): tuple,
            ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): _latin1_bytes}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED.update({(_module, "_reconstruct"): _RECONSTRUCT, (_module, "scalar"): _SCALAR})
MAX_DEPTH = 32  # a state dict nests two or three levels (optimizer -> LR_Scheduler -> values)


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it would call {module}.{name}")
        return allowed

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids")


def _check_contents(value, depth=0):
    """The reason `value` is not plain state-dict data, or None."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, np.ndarray):
        return "it holds an array of Python objects" if value.dtype.hasobject else None
    if value is None or isinstance(value, (str, bytes, bool, int, float, np.generic)):
        return None
    if isinstance(value, dict):
        items = [item for pair in value.items() for item in pair]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return f"it holds a {type(value).__name__}"
    for item in items:
        reason = _check_contents(item, depth + 1)
        if reason:
            return reason
    return None


def check_state_pickle(data: bytes, path):
    """Raise a UserError naming `path` unless `data` is a pickled state dict and nothing more."""
    try:
        state = _StateUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as reason:
        raise UserError(f"{path}: refused: not a plain paddle.save state dict ({reason}); "
                        "see doc/reliability.md") from None
    except Exception as reason:  # truncated or garbled: EOFError, ValueError, RecursionError...
        raise UserError(f"{path}: corrupt or unreadable checkpoint file ({type(reason).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: corrupt checkpoint file (expected a state dict, got {type(state).__name__})")
    reason = _check_contents(state)
    if reason:
        raise UserError(f"{path}: refused: not a plain paddle.save state dict ({reason}); see doc/reliability.md")


PARAMS_FILE = "rec.pdparams"
OPTIMIZER_FILE = "rec.pdopt"
META_FILE = "meta.json"


def _fsync_file(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_checkpoint_files(model, optimizer, folder, epoch, extra):
    import paddle

    paddle.save(model.state_dict(), os.path.join(folder, PARAMS_FILE))
    if optimizer is not None:
        # SGD, or Adam before its first step, has an empty state; Paddle
        # warns but writes the file, which the layout needs anyway.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The input state dict is empty")
            paddle.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
    meta = {"epoch": epoch, "optimizer": optimizer_name(optimizer), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "extra": extra or {}}
    with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1, sort_keys=True)
    for name in os.listdir(folder):
        _fsync_file(os.path.join(folder, name))


def save_checkpoint(model, optimizer, save_dir, epoch, extra=None) -> str:
    """Write <save_dir>/<epoch>/ atomically; return that folder's path.

    An existing folder for the same epoch is replaced: it is renamed aside,
    the new one renamed in, then the old one deleted (a folder cannot be
    atomically renamed over a non-empty one). On any failure the temporary
    folder is removed and the previous checkpoint, if any, stays in place.
    """
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as reason:
        raise UserError(f"{save_dir}: cannot create checkpoint folder: {reason.strerror}") from None
    final = os.path.join(save_dir, str(epoch))
    staging = tempfile.mkdtemp(prefix=f".{epoch}.saving-", dir=save_dir)
    try:
        # mkdtemp makes the folder private (0700); a checkpoint should get
        # the permissions any folder made by os.makedirs would.
        os.chmod(staging, 0o777 & ~umask())
        _write_checkpoint_files(model, optimizer, staging, epoch, extra)
        if os.path.exists(final):
            retired = tempfile.mkdtemp(prefix=f".{epoch}.old-", dir=save_dir)
            os.replace(final, os.path.join(retired, "checkpoint"))
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_folder(save_dir)
    except BaseException as reason:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(reason, OSError) and reason.strerror:
            raise UserError(f"{final}: cannot write checkpoint: {reason.strerror}") from None
        raise
    return final


def optimizer_name(optimizer):
    return None if optimizer is None else type(optimizer).__name__


def read_checkpoint_meta(path) -> dict:
    """meta.json of a checkpoint folder, checked ({} when it has none); UserError naming it when malformed."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        return {}
    meta = read_json_object(meta_path, "checkpoint metadata")
    extra = meta.get("extra", {})
    problem = None
    if "epoch" in meta and not is_count(meta["epoch"]):
        problem = f'"epoch" must be a non-negative integer, got {str(meta["epoch"])[:40]}'
    elif not isinstance(extra, dict):
        problem = f'"extra" must be an object, got {type(extra).__name__}'
    elif "step" in extra and not is_count(extra["step"]):
        problem = f'"extra.step" must be a non-negative integer, got {str(extra["step"])[:40]}'
    elif not isinstance(meta.get("optimizer", ""), (str, type(None))):
        problem = '"optimizer" must be a class name'
    if problem:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata ({problem})")
    return meta


def _load_state(path):
    import paddle

    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint file not found")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as reason:
        raise UserError(f"{path}: cannot read checkpoint file: {reason.strerror}") from None
    # Checked first, then loaded from the same bytes: a file swapped in between cannot slip through.
    check_state_pickle(data, path)
    try:
        state = paddle.load(io.BytesIO(data))
    except Exception as reason:  # paddle raises ValueError, EOFError, pickle errors...
        raise UserError(f"{path}: corrupt or unreadable checkpoint file ({type(reason).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: corrupt checkpoint file (expected a state dict, got {type(state).__name__})")
    return state


def _shape(value):
    return [int(size) for size in value.shape]


def _check_matches_model(path, state, model_state):
    """Refuse a checkpoint that does not fit the model, naming what differs.

    Paddle's set_state_dict only warns about missing or misshapen entries and
    leaves those parameters at their random initial values.
    """
    missing = [name for name in model_state if name not in state]
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{path}: parameter(s) missing from checkpoint: {listed}")
    unexpected = [name for name in state if name not in model_state]
    if unexpected:
        listed = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise UserError(f"{path}: checkpoint has parameter(s) the model lacks: {listed}")
    for name, value in model_state.items():
        saved = state[name]
        if not hasattr(saved, "shape"):
            raise UserError(f"{path}: parameter {name}: not a tensor in the checkpoint")
        if _shape(saved) != _shape(value):
            raise UserError(f"{path}: parameter {name}: checkpoint shape {_shape(saved)} does not match model shape {_shape(value)}")


def checkpoint_epoch(path, meta):
    """The epoch of a checkpoint folder: its name when that is a number (meta.json must agree), else
    meta.json's "epoch", else None."""
    name = os.path.basename(os.path.normpath(path))
    if not (name.isascii() and name.isdigit()):
        return meta.get("epoch")
    if meta.get("epoch", int(name)) != int(name):
        raise UserError(f"{os.path.join(path, META_FILE)}: says epoch {meta['epoch']}, but the folder is "
                        f"epoch {int(name)}: not a checkpoint written here")
    return int(name)


def load_checkpoint(path, model, optimizer=None):
    """Load an epoch folder into `model` (and `optimizer` when given).

    Returns the checkpoint's epoch (checkpoint_epoch(): the folder name when
    it is a number). Every problem is a UserError naming the file.
    """
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint folder not found")
    meta = read_checkpoint_meta(path)
    epoch = checkpoint_epoch(path, meta)
    saved_optimizer = meta.get("optimizer")
    if optimizer is not None and saved_optimizer and saved_optimizer != optimizer_name(optimizer):
        # Paddle would silently ignore the other optimizer's state (Adam moments into SGD, or none into Adam).
        raise UserError(f"{os.path.join(path, OPTIMIZER_FILE)}: holds the state of optimizer {saved_optimizer}; "
                        f"this run uses {optimizer_name(optimizer)} (resume with the same optimizer class)")
    params_path = os.path.join(path, PARAMS_FILE)
    state = _load_state(params_path)
    _check_matches_model(params_path, state, model.state_dict())
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = _load_state(os.path.join(path, OPTIMIZER_FILE))
    model.set_state_dict(state)
    if optimizer_state is not None:
        optimizer.set_state_dict(optimizer_state)
    return epoch


def latest_checkpoint(save_dir):
    """The newest complete epoch folder <save_dir>/<epoch> (highest number), or None.

    Saves are atomic (see save_checkpoint), so an epoch folder that exists
    and holds rec.pdparams is complete; the hidden temporary folders of an
    interrupted save (.<epoch>.saving-*) are not epoch folders.
    """
    if not os.path.isdir(save_dir):
        return None
    epochs = [(int(name), name) for name in os.listdir(save_dir)
              if name.isascii() and name.isdigit() and os.path.isfile(os.path.join(save_dir, name, PARAMS_FILE))]
    return os.path.join(save_dir, max(epochs)[1]) if epochs else None


LOCK_FILE = ".trainer.lock"
_STAGING = re.compile(r"^\.(\d+\.(saving|old)-.*|best\.json\..*\.tmp|replaced-.*)$")
# What a training run writes into its folder besides the epoch folders.
RUN_FILES = ("metrics.jsonl", "best.json", "infer_metrics.jsonl")


def _holder(descriptor) -> str:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 300).decode("utf-8", "replace")
    return " ".join(text.split())[:200]  # written by another process: one printable line at most


def lock_run_folder(folder):
    """Hold <folder>/.trainer.lock until this process ends (warns when a dead holder's lock is taken over).

    Raises a UserError naming the folder and the holder when a live process has it.
    """
    path = os.path.join(folder, LOCK_FILE)
    created = []  # folders made here, removed again at exit when the run wrote nothing into them
    parent = folder
    while parent and not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(descriptor) or "a process that has not written its name yet"
                os.close(descriptor)
                raise UserError(f"{folder}: in use by another trainer ({holder}); wait for it to end or choose "
                                "another runner.model_save_path") from None
            try:  # the previous holder may have removed the file between our open and flock
                if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        previous = _holder(descriptor)
        record = f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, record.encode("utf-8"), 0)
    except OSError as reason:
        raise UserError(f"{path}: cannot lock the run folder: {reason.strerror}") from None
    atexit.register(_release, path, descriptor, created)
    if previous:
        warn(f"{folder}: took over the lock of {previous} (that trainer is no longer running)")


def _release(path, descriptor, created):
    try:
        os.remove(path)  # while still holding it: the next trainer then starts from a clean folder
    except OSError:
        pass
    os.close(descriptor)
    for folder in created:
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            break


def remove_stale_staging(folder):
    """Remove (and log) what interrupted saves left in `folder`."""
    if not os.path.isdir(folder):
        return
    removed = sorted(name for name in os.listdir(folder) if _STAGING.match(name))
    for name in removed:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    if removed:
        log(f"{folder}: removed what interrupted saves left: {', '.join(removed)}")


def old_run_entries(folder) -> list:
    """The entries of a finished or interrupted run in `folder`: epoch folders and RUN_FILES."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if (name.isascii() and name.isdigit() and os.path.isdir(os.path.join(folder, name)))
                  or name in RUN_FILES)


def replace_old_run(folder, overwrite, key="runner.overwrite"):
    """Before a fresh start: refuse a folder with checkpoints, or with `overwrite` remove the old run."""
    entries = old_run_entries(folder)
    epochs = sorted((name for name in entries if name.isdigit()), key=int)
    if not epochs:
        return
    if not overwrite:
        raise UserError(f"{folder}: holds the checkpoints of another run (epochs {', '.join(epochs)}); "
                        f"resume it with runner.resume_path=auto, or replace it with {key}=True")
    moved = []
    try:
        aside = tempfile.mkdtemp(prefix=".replaced-", dir=folder)
        for name in entries:
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
            moved.append(name)
    except BaseException as reason:  # put back what was moved: the old run stays whole or goes whole
        for name in moved:
            os.replace(os.path.join(aside, name), os.path.join(folder, name))
        if isinstance(reason, OSError):
            raise UserError(f"{folder}: cannot move the old run aside: {reason.strerror}") from None
        raise
    shutil.rmtree(aside, ignore_errors=True)  # an interrupted removal is finished by remove_stale_staging
    log(f"{folder}: removed the old run ({', '.join(entries)}) as {key}=True asks")
