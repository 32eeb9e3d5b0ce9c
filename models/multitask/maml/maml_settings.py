"""Reading this model's settings from a config, each bad value a one-line error naming its key.

Shared by the plugin (dygraph_model.py, few_shot.py) and the reader (omniglot_reader.py). `config` is the
tools' Config, whose error() names the config file, or any mapping of dotted keys (PaddleRec's tools, the
tests, a user's own loop), which gets a ValueError "key: message".
"""
import numbers


def error(config, key, message):
    """The exception to raise for a bad `key` (or a bad data path, named in its place)."""
    if hasattr(config, "error"):
        return config.error(key, message)
    return ValueError(f"{key}: {message}")


def is_int(value):
    """An integer and not a bool (YAML's `true` would otherwise pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def setting(config, key, default=None):
    """config[key], or `default` when the key is unset or null (the tools declare some keys without a value);
    an error when both are missing."""
    value = config.get(key)
    if value is None:
        value = default
    if value is None:
        raise error(config, key, "missing required key")
    return value


def positive_int(config, key, default=None):
    value = setting(config, key, default)
    if not is_int(value) or value < 1:
        raise error(config, key, f"must be a positive integer, got {value!r}")
    return int(value)


def nonnegative_int(config, key, default=None):
    value = setting(config, key, default)
    if not is_int(value) or value < 0:
        raise error(config, key, f"must be a non-negative integer, got {value!r}")
    return int(value)


def boolean(config, key, default=None):
    value = setting(config, key, default)
    if not isinstance(value, bool):
        raise error(config, key, f"must be true or false, got {value!r}")
    return value


def positive_float(config, key, default=None):
    value = setting(config, key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise error(config, key, f"must be a positive number, got {value!r}")
    return float(value)


def choice(config, key, choices, default=None):
    """One of the strings in `choices` (a typo must not fall back to a default silently)."""
    value = setting(config, key, default)
    if not isinstance(value, str) or value not in choices:
        raise error(config, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
