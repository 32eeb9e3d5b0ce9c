"""Imported first by every script in tools/: Python puts the script's folder first on sys.path, where tools/utils
would shadow a plugin's own `utils`; this puts the repository root there instead (`import tools.utils` works)."""
import os
import sys

_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if not entry or os.path.abspath(entry) != _TOOLS_DIR]
sys.path.insert(0, os.path.dirname(_TOOLS_DIR))
