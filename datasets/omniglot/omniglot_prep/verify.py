"""Check that an archive holds the Omniglot images, and list its characters.

The local mirror's archives were repacked (same images, other zip bytes), so an
md5 outside the known set is not an error by itself: what decides is the
content, counted from the archive listing (alphabets, characters, 20 PNGs
each). The copy step re-counts what it actually unpacked.

Before anything is counted or written, every member of an archive must be a
plain file or folder under the archive's top folder (images_background/...):
a name with `..`, `.` or empty parts, an absolute path, a backslash, a
symbolic link or other special entry, or a declared size above MAX_MEMBER_BYTES
refuses the whole archive, so a hostile archive writes nothing at all.
"""
import hashlib
import re
import stat
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
# An Omniglot PNG is about 1 KB. A member declaring (or, unpacked, holding) more than this is refused before it is
# read: a zip bomb (1 GiB of zeros packs into about 1 MB) must not fill the memory or the disk.
MAX_MEMBER_BYTES = 1 << 20


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
            for info in zf.infolist():
                reason = unsafe_member_reason(info, top)
                if reason:
                    raise PrepareError(f"{name}: refusing {path}: member {info.filename!r} {reason}; "
                                       "nothing was written")
            for member in zf.namelist():
                parts = member.split("/")
                if len(parts) == 4 and parts[0] == top and parts[3].lower().endswith(".png"):
                    chars[(parts[1], parts[2])].append(member)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError(f"{name}: not a readable zip archive ({path}: {exc})") from None
    check_counts(name, path, chars)
    return {key: sorted(members) for key, members in sorted(chars.items())}


def unsafe_member_reason(info, top):
    """Why the zip member `info` must not be unpacked, or None when it is a plain file or folder in top/."""
    member = info.filename
    if member.startswith("/") or re.match(r"[A-Za-z]:", member):
        return "is an absolute path"
    if "\\" in member:
        return "has a backslash (a path separator on Windows)"
    parts = member[:-1].split("/") if member.endswith("/") else member.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has a '..', '.' or empty path part"
    if parts[0] != top:
        return f"is outside the archive's folder {top}/"
    if info.file_size > MAX_MEMBER_BYTES:
        return (f"declares {info.file_size} bytes unpacked, above the {MAX_MEMBER_BYTES} bytes "
                "(verify.MAX_MEMBER_BYTES) an Omniglot image can need")
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type; 0 when the archiver stored none
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "is a symbolic link or special file"
    return None


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
