"""Turning tensors, numpy values and metric results into plain numbers.

Plugins hand the tools tensors (loss, print_dict values) and metric objects
whose accumulate() returns a float (PaddleRec's contract; a metric may add a
details() method returning a dict with more keys, e.g. a confidence interval)
or a dict of floats; logs and the metrics file need plain Python numbers.
"""
import numbers


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
