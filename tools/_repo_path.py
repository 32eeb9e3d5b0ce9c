"""Imported first by every script in tools/: makes `import tools.utils` work from any working directory.

Python puts a script's folder (tools/) first on sys.path, where tools/utils would shadow a model plugin's own
`utils` module; this swaps it for the repository root.
"""
import os
import sys

_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if not entry or os.path.abspath(entry) != _TOOLS_DIR]
sys.path.insert(0, os.path.dirname(_TOOLS_DIR))
