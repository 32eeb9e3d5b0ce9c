"""Minimal PNG writer for 1-bit greyscale images, like Omniglot's files.

Our own encoder (not Pillow's) so the bytes depend only on the pixels and on
zlib's deflate at level 9, not on an image library's version or metadata.
"""
import struct
import zlib

import numpy as np


def _chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode(ink):
    """PNG bytes of a bool [H, W] array; ink (True) is black, paper white."""
    height, width = ink.shape
    rows = np.packbits(~ink, axis=1)  # 1 = white, MSB = leftmost pixel
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
