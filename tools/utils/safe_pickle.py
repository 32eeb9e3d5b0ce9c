"""Reading paddle.save state dicts (rec.pdparams, rec.pdopt) without running code.

A pickle can call any importable function while it loads, so paddle.load on a
hostile file runs whatever the file says. What paddle.save writes for a state
dict (Paddle 2.x and 3.x, protocols 2-4; tools/utils/checkpoint.py's files and
PaddleRec's) needs only these globals: numpy's array reconstruction, a tuple
(Paddle 2.1 stored a tensor as (name, array)), OrderedDict, and, for protocol
2, _codecs.encode to rebuild bytes. check_state_pickle() unpickles the bytes
with exactly those allowed and checks that the result holds nothing but
arrays, names, numbers and nested dicts/lists; only bytes that pass are handed
to paddle.load, which then converts the arrays to tensors as it always has.
"""
import collections
import io
import pickle

import numpy as np

from tools.utils.errors import UserError


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
