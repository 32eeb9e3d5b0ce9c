"""Check that an archive holds the Omniglot images, and list its characters.

The local mirror's archives were repacked (same images, other zip bytes), so an
md5 outside the known set is not an error by itself: what decides is the
content, counted from the archive listing (alphabets, characters, 20 PNGs
each). The copy step re-counts what it actually unpacked.
"""
import hashlib
import zipfile
from collections import defaultdict

from . import PrepareError

IMAGES_PER_CHARACTER = 20
# archive -> (alphabets, characters) of the official Omniglot release
EXPECTED = {
    "images_background.zip": (30, 964),
    "images_evaluation.zip": (20, 659),
}
KNOWN_MD5 = {
    "images_background.zip": {
        "68d2efa1b9178cc56df9314c21c6e718": "official",
        "af02123a84a003ad6572a03696efa473": "repacked mirror",
    },
    "images_evaluation.zip": {
        "6b91aef0f799c5bb55b94e3f2daec811": "official",
        "6760a4076b69dd01b974e22695170c84": "repacked mirror",
    },
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5_note(name, path):
    """A short human note on the archive's md5 (informative, never fatal)."""
    md5 = md5sum(path)
    known = KNOWN_MD5.get(name, {}).get(md5)
    return f"md5 {md5} ({known})" if known else f"md5 {md5} (not a known one; content checked by count)"


def list_characters(name, path):
    """{(alphabet, character): [zip member names]} of a verified archive."""
    top = name[: -len(".zip")]
    chars = defaultdict(list)
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                parts = member.split("/")
                if len(parts) == 4 and parts[0] == top and parts[3].lower().endswith(".png"):
                    chars[(parts[1], parts[2])].append(member)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError(f"{name}: not a readable zip archive ({path}: {exc})") from None
    check_counts(name, path, chars)
    return {key: sorted(members) for key, members in sorted(chars.items())}


def check_counts(name, path, chars):
    want_alphabets, want_chars = EXPECTED[name]
    alphabets = {alphabet for alphabet, _ in chars}
    odd = sum(1 for members in chars.values() if len(members) != IMAGES_PER_CHARACTER)
    if len(alphabets) != want_alphabets or len(chars) != want_chars or odd:
        raise PrepareError(
            f"{name}: wrong content in {path}: expected {want_alphabets} alphabets and "
            f"{want_chars} characters x {IMAGES_PER_CHARACTER} PNGs, found {len(alphabets)} "
            f"alphabets and {len(chars)} characters ({odd} without exactly "
            f"{IMAGES_PER_CHARACTER} PNGs); delete it if it is a bad download")
