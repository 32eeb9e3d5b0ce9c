"""Per-epoch checkpoints in PaddleRec's layout, written atomically.

Layout: <save_dir>/<epoch>/rec.pdparams (model.state_dict()),
rec.pdopt (optimizer.state_dict()) and meta.json (epoch, optimizer class,
time, extra). Loading never runs code from these files: the state dicts go
through tools/utils/safe_pickle.py, meta.json is checked field by field, and
the folder's name, not meta.json, says which epoch it is.
A checkpoint folder either exists complete or not at all: files are written
into a hidden temporary sibling and the folder is renamed into place, so an
interrupted save never leaves a half-written epoch that a resume would load.
"""
import io
import json
import os
import shutil
import tempfile
import time
import warnings

from tools.utils.errors import UserError
from tools.utils.json_files import is_count, read_json_object, umask
from tools.utils.safe_pickle import check_state_pickle

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
