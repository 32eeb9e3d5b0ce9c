#!/bin/sh
# Prepares the Omniglot splits next to this script (see readme.md).
# POSIX sh on purpose: it only finds its own folder and hands over to Python,
# so it works from any cwd. Set PYTHON to pick the interpreter.
set -e
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec "${PYTHON:-python}" "$here/prepare.py" "$@"
