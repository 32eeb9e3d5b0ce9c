"""Building blocks of prepare.py: fetch the archives, verify them, split, write."""


class PrepareError(Exception):
    """A user-facing failure: prepare.py prints its message as one line and exits 1."""
