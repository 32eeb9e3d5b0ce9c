"""Parsing and typing of command-line overrides (`-o key=value`).

Kept apart from config.py so the rules for turning text into a typed value
live in one place: a value is typed like the value it replaces, so a typo such
as `-o runner.epochs=0.5` fails loudly instead of training for 0.5 epochs.
"""
import re

import yaml

_INT_TEXT = re.compile(r"^[+-]?\d+$")
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}
_NONE_WORDS = {"null", "none", "~"}


def split_override(item: str):
    """'key=value' -> (key, value text). Returns None when there is no '='."""
    if "=" not in item:
        return None
    key, text = item.split("=", 1)
    return key.strip(), text


def convert_value(text: str, type_, none_allowed: bool = False):
    """Turn override text into `type_`; raises ValueError with a short reason.

    `type_` is one of bool, int, float, str, list, or None (unknown type: the
    text is read as YAML, so `-o a=3` gives 3 and `-o a=x` gives 'x').
    `none_allowed` lets keys whose default is None be reset with `null`.
    """
    stripped = text.strip()
    if none_allowed and stripped.lower() in _NONE_WORDS:
        return None
    if type_ is bool:
        word = stripped.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError(f"expected bool (true/false/1/0/yes/no), got {text!r}")
    if type_ is int:
        if not _INT_TEXT.match(stripped):
            raise ValueError(f"expected int, got {text!r}")
        return int(stripped)
    if type_ is float:
        try:
            return float(stripped)
        except ValueError:
            raise ValueError(f"expected float, got {text!r}") from None
    if type_ is str:
        return text
    if type_ is list:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, list):
            raise ValueError(f"expected a list such as [3, 3], got {text!r}")
        return value
    # Unknown type (the key's current value is None): YAML decides, and text
    # that is not valid YAML on its own stays a plain string.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
