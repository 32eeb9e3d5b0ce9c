"""What a run keeps on disk: per-epoch checkpoints in PaddleRec's layout, small JSON files, and the run folder
(doc/tools.md, doc/reliability.md). Everything is written atomically (staged()); nothing read back is trusted."""
import atexit
import collections
import contextlib
import fcntl
import io
import json
import math
import os
import pickle
import re
import reprlib
import shutil
import socket
import stat
import tempfile
import time
import warnings

import numpy as np

from tools.utils.config import is_number
from tools.utils.console import UserError, log, warn

PARAMS_FILE, OPTIMIZER_FILE, META_FILE, LOCK_FILE = "rec.pdparams", "rec.pdopt", "meta.json", ".trainer.lock"
CHECKPOINT_FILES = (PARAMS_FILE, OPTIMIZER_FILE, META_FILE)  # all an epoch folder written here holds
RUN_FILES = ("metrics.jsonl", "best.json", "infer_metrics.jsonl")  # what a run writes beside its epoch folders
# What interrupted saves and removals leave (staged()'s temporary siblings, replace_old_run's .replaced-*).
_STAGING = re.compile(r"^\.(\d+\.(saving|old)-.*|.*\.json\..*\.tmp|replaced-.*)$")
MAX_JSON_BYTES = 4 * 1024 * 1024  # best.json of thousands of validated epochs stays far below


def is_count(value) -> bool:
    return is_number(value, int) and value >= 0


def json_safe(value):
    """NaN and infinities as null, which JSON has; a value JSON has no type for (a YAML date in a config value) as
    its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


def read_file(path, what, limit=-1) -> bytes:
    """The bytes of `path` (at most `limit` + 1), else a UserError naming it."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit + 1 if limit >= 0 else -1)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as reason:
        raise UserError(f"{path}: cannot read {what}: {reason.strerror}") from None


def read_json_object(path, what, fields=()) -> dict:
    """The JSON object in `path` (at most MAX_JSON_BYTES) whose [(dotted name, fits, rule)] `fields` fit (an absent
    one is None), else UserError '<path>: corrupt <what> (...)': every JSON file the tools read back is read here."""
    data = read_file(path, what, MAX_JSON_BYTES)
    try:
        if len(data) > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
        value = json.loads(data.decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        for name, fits, rule in fields:
            field = value
            for part in name.split("."):
                field = field.get(part) if isinstance(field, dict) else None
            if not fits(field):
                raise ValueError(f"\"{name}\" must be {rule}, got {str(field)[:40]}")
    except RecursionError:
        raise UserError(f"{path}: corrupt {what} (nested too deeply)") from None
    except ValueError as reason:  # UnicodeDecodeError too
        raise UserError(f"{path}: corrupt {what} ({reason})") from None
    return value


def optional(check):
    return lambda value: value is None or check(value)


@contextlib.contextmanager
def staged(path, folder=False, what=""):
    """Yield a hidden temporary sibling of `path` (a file, or a folder) to write, then rename it into place (an old
    folder aside first): readers see the old or the new `path`, never half of one."""
    parent, name = os.path.split(os.path.abspath(path))
    temporary, mask = None, os.umask(0)
    os.umask(mask)
    try:
        os.makedirs(parent, exist_ok=True)
        if folder:
            temporary = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
        else:
            descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
            os.close(descriptor)
        os.chmod(temporary, (0o777 if folder else 0o666) & ~mask)  # like any folder or file made here
        yield temporary
        for file in [os.path.join(temporary, entry) for entry in os.listdir(temporary)] if folder else [temporary]:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent) if folder and os.path.exists(path) else None
        if retired:
            os.replace(path, os.path.join(retired, name))
        os.replace(temporary, path)
        temporary = None
        if retired:
            shutil.rmtree(retired, ignore_errors=True)
        descriptor = os.open(parent, os.O_RDONLY)
        os.fsync(descriptor)  # the renames themselves
        os.close(descriptor)
    except BaseException as reason:
        if temporary is not None:
            _remove(temporary)
        if isinstance(reason, OSError) and reason.strerror:
            raise UserError(f"{path}: cannot write{what}: {reason.strerror}") from None
        raise


def write_json_atomically(path, data):
    with staged(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(json_safe(data), handle, indent=1)
        handle.write("\n")


def _latin1_bytes(text, encoding="latin1"):
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"); nothing else is needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


# The only globals a paddle.save state dict names (numpy's functions are numpy.core's in numpy 1, _core's in 2).
_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("builtins", "tuple"): tuple, ("__builtin__", "tuple"): tuple,
            ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): _latin1_bytes}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED.update({(_module, "_reconstruct"): np.zeros(0).__reduce__()[0],
                     (_module, "scalar"): np.float32(0).__reduce__()[0]})


class _StateUnpickler(pickle.Unpickler):
    """Only the allowed globals and no persistent ids: what it loads cannot have run code."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it would call {module}.{name}")
        return _ALLOWED[module, name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids")


def _plain(value, depth=0) -> bool:
    """Whether `value` holds only what a state dict does: number arrays, names, numbers, dicts, lists, tuples."""
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    if isinstance(value, (dict, list, tuple)) and depth < 32:  # a state dict nests two or three levels
        items = [item for pair in value.items() for item in pair] if isinstance(value, dict) else value
        return all(_plain(item, depth + 1) for item in items)
    return value is None or isinstance(value, (str, bytes, bool, int, float, np.generic))


def _load_state(path):
    """The state dict in `path`, checked by _StateUnpickler before Paddle loads the same bytes."""
    import paddle

    data = read_file(path, "checkpoint file")
    try:
        if not _plain(_StateUnpickler(io.BytesIO(data), encoding="latin1").load()):
            raise pickle.UnpicklingError("it holds more than arrays of numbers, names and numbers")
        state = paddle.load(io.BytesIO(data))
    except pickle.UnpicklingError as reason:
        raise UserError(f"{path}: refused: not a plain paddle.save state dict ({reason}); "
                        "see doc/reliability.md") from None
    except Exception as reason:  # noqa: BLE001 truncated or garbled: EOFError, ValueError, RecursionError...
        raise UserError(f"{path}: corrupt or unreadable checkpoint file ({type(reason).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: corrupt checkpoint file (expected a state dict, got {type(state).__name__})")
    return state


def save_checkpoint(model, optimizer, save_dir, epoch, extra=None) -> str:
    """Write <save_dir>/<epoch>/ atomically, replacing an older folder of that epoch; return its path."""
    import paddle

    final = os.path.join(save_dir, str(epoch))
    with staged(final, folder=True, what=" checkpoint") as staging:
        paddle.save(model.state_dict(), os.path.join(staging, PARAMS_FILE))
        if optimizer is not None:
            with warnings.catch_warnings():  # SGD's state is empty; the layout needs the file anyway
                warnings.filterwarnings("ignore", message="The input state dict is empty")
                paddle.save(optimizer.state_dict(), os.path.join(staging, OPTIMIZER_FILE))
        meta = {"epoch": epoch, "optimizer": optimizer and type(optimizer).__name__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extra": extra or {}}
        with open(os.path.join(staging, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(json_safe(meta), handle, indent=1, sort_keys=True)  # recorded settings may be any YAML value
    return final


def _epoch_of(path):
    name = os.path.basename(os.path.normpath(path))
    return int(name) if name.isascii() and name.isdigit() else None


def read_checkpoint_meta(path) -> dict:
    """meta.json of a checkpoint folder, checked; {} without one."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        return {}
    meta = read_json_object(meta_path, "checkpoint metadata", [
        ("epoch", optional(is_count), "a non-negative integer"),
        ("extra", optional(lambda extra: isinstance(extra, dict)), "an object"),
        ("extra.step", optional(is_count), "a non-negative integer"),
        ("extra.settings", optional(lambda settings: isinstance(settings, dict)), "an object"),
        ("optimizer", optional(lambda name: isinstance(name, str)), "a class name")])
    epoch = _epoch_of(path)
    if epoch is not None and meta.get("epoch", epoch) != epoch:
        raise UserError(f"{meta_path}: says epoch {meta['epoch']}, but the folder is epoch {epoch}: not a "
                        "checkpoint written here")
    return meta


def load_checkpoint(path, model, optimizer=None, settings=None):
    """Load an epoch folder into `model` (and `optimizer`); its epoch: the folder's name if a number, else meta's.
    `settings` {key: value} of this run are compared with those the checkpoint recorded: a difference is a warning
    (evaluating a model under other settings may be meant, but is rarely what a user wants)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint folder not found")
    meta = read_checkpoint_meta(path)
    recorded = meta.get("extra", {}).get("settings") or {}
    for key, value in (settings or {}).items():
        if key in recorded and recorded[key] != value:
            warn(f"{os.path.join(path, META_FILE)}: trained with {key} = {reprlib.repr(recorded[key])}, loaded "
                 f"with {reprlib.repr(value)}")  # repr: the file's value on one short line, whatever it holds
    saved_optimizer = meta.get("optimizer")
    if optimizer is not None and saved_optimizer and saved_optimizer != type(optimizer).__name__:
        # Paddle would silently ignore the other optimizer's state (Adam moments into SGD, or none into Adam).
        raise UserError(f"{os.path.join(path, OPTIMIZER_FILE)}: holds the state of optimizer {saved_optimizer}; "
                        f"this run uses {type(optimizer).__name__} (resume with the same optimizer class)")
    params_path = os.path.join(path, PARAMS_FILE)
    state, model_state = _load_state(params_path), model.state_dict()
    # Paddle's set_state_dict only warns about missing or misshapen entries and leaves them at random values.
    for names, problem in (([n for n in model_state if n not in state], "parameter(s) missing from checkpoint"),
                           ([n for n in state if n not in model_state], "checkpoint has parameter(s) the model lacks")):
        if names:
            raise UserError(f"{params_path}: {problem}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    for key, value in model_state.items():
        if not hasattr(state[key], "shape"):
            raise UserError(f"{params_path}: parameter {key}: not a tensor in the checkpoint")
        saved, wanted = [int(size) for size in state[key].shape], [int(size) for size in value.shape]
        if saved != wanted:
            raise UserError(f"{params_path}: parameter {key}: checkpoint shape {saved} does not match model shape "
                            f"{wanted}")
    optimizer_state = _load_state(os.path.join(path, OPTIMIZER_FILE)) if optimizer is not None else None
    model.set_state_dict(state)
    if optimizer_state is not None:
        optimizer.set_state_dict(optimizer_state)
    return meta.get("epoch") if _epoch_of(path) is None else _epoch_of(path)


def is_checkpoint_folder(path, strict=True) -> bool:
    """A real folder with rec.pdparams and (`strict`) only checkpoint files; one holding more is the user's."""
    try:
        entries = set(os.listdir(path)) if not (strict and os.path.islink(path)) else set()
    except OSError:
        return False
    return PARAMS_FILE in entries and os.path.isfile(os.path.join(path, PARAMS_FILE)) \
        and (not strict or entries <= set(CHECKPOINT_FILES))


def checkpoint_epochs(folder, strict=True):
    """The sorted epochs of the checkpoint folders in `folder`, named as save_checkpoint names them."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(_epoch_of(name) for name in names if _epoch_of(name) is not None and name == str(_epoch_of(name))
                  and is_checkpoint_folder(os.path.join(folder, name), strict))


def latest_checkpoint(save_dir):
    """The newest epoch folder with rec.pdparams (saves are atomic), or None; read only, so not `strict`."""
    epochs = checkpoint_epochs(save_dir, strict=False)
    return os.path.join(save_dir, str(epochs[-1])) if epochs else None


def file_in_the_way(folder):
    """The first existing path of `folder` and its parents, if it is not a folder."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def is_run_file(path, field=None) -> bool:
    """Whether `path` is a regular file the tools write: empty, a JSON object with `field` (best.json's: "history"),
    or else a metrics file, whose first line is a JSON object with an "event"."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    field = field or ("history" if os.path.basename(path) == "best.json" else None)
    try:
        if field is not None:
            return field in read_json_object(path, "JSON file")
        with open(path, "rb") as handle:
            line = handle.readline(MAX_JSON_BYTES)
        return not line or isinstance(json.loads(line.decode("utf-8")).get("event"), str)
    except (UserError, OSError, ValueError, RecursionError, AttributeError):
        return os.path.getsize(path) == 0


def check_output_file(path, what, key=None, owned=is_run_file):
    """Refuse to write `what` (e.g. "metrics") over a file the tools did not write; absent files, character devices
    (/dev/null) and the files `owned` recognises as the tools' own pass."""
    where = f" ({key})" if key else ""
    if not os.path.lexists(path):
        in_the_way = file_in_the_way(os.path.dirname(os.path.abspath(path)))
        if in_the_way:
            raise UserError(f"{in_the_way}: is a file, not a folder; cannot write the {what} file {path}{where}")
        return
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a folder, expected a {what} file{where}")
    if stat.S_ISCHR(mode):
        return
    if not stat.S_ISREG(mode) or os.path.islink(path):
        raise UserError(f"{path}: not a regular file; refusing to write the {what} file there{where}")
    if os.path.getsize(path) > 0 and not owned(path):  # an empty file holds nothing to lose
        raise UserError(f"{path}: exists and is not a {what} file written by these tools; refusing to overwrite "
                        f"it{where}: choose another path or move the file")


def check_epoch_folders(save_dir, epochs):
    """Refuse a run that would save one of `epochs` where a folder or file that is not a checkpoint stands."""
    for epoch in epochs:
        path = os.path.join(save_dir, str(epoch))
        if os.path.lexists(path) and not is_checkpoint_folder(path):
            kind = "folder" if os.path.isdir(path) and not os.path.islink(path) else "file"
            raise UserError(f"{path}: a {kind} that is not a checkpoint of this trainer stands where the checkpoint "
                            f"of epoch {epoch} goes; move it or choose another runner.model_save_path")


def _holder(descriptor) -> str:
    return " ".join(os.pread(descriptor, 300, 0).decode("utf-8", "replace").split())[:200]  # another process wrote it


def lock_run_folder(folder):
    """Hold an exclusive flock on <folder>/.trainer.lock for the life of this process, then remove what interrupted
    saves left. The file names the holder for a second trainer's error; a dead holder's lock is taken over (the
    kernel dropped it). A clean exit removes it, and the folders made here if they stayed empty."""
    path, created, parent = os.path.join(folder, LOCK_FILE), [], folder
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
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break  # else the previous holder removed the file between our open and flock: again
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
    removed = sorted(name for name in os.listdir(folder) if _STAGING.match(name))  # safe now: no save is running
    for name in removed:
        _remove(os.path.join(folder, name))
    if removed:
        log(f"{folder}: removed what interrupted saves left: {', '.join(removed)}")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _release(path, descriptor, created):
    with contextlib.suppress(OSError):
        os.remove(path)  # while still holding it: the next trainer starts from a clean folder
    os.close(descriptor)
    for made in created:
        try:
            os.rmdir(made)  # only when the run wrote nothing into it
        except OSError:
            break


def replace_old_run(folder, overwrite):
    """Before a fresh start: refuse a folder that holds checkpoints, or with `overwrite` remove the old run (its
    checkpoint folders and RUN_FILES) as a whole, moved into one hidden folder first."""
    epochs = checkpoint_epochs(folder)
    if not epochs:
        return
    if not overwrite:
        raise UserError(f"{folder}: holds the checkpoints of another run (epochs {', '.join(map(str, epochs))}); "
                        "resume it with runner.resume_path=auto, or replace it with runner.overwrite=True")
    entries = sorted([str(epoch) for epoch in epochs] + [name for name in RUN_FILES
                                                         if is_run_file(os.path.join(folder, name))])
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
    shutil.rmtree(aside, ignore_errors=True)  # an interrupted removal is finished by the next lock
    log(f"{folder}: removed the old run ({', '.join(entries)}) as runner.overwrite=True asks")
