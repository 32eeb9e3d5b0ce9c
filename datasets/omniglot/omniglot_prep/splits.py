"""Write one split atomically, tell whether a split is complete, clean leftovers.

A split is built in a hidden temporary sibling folder (.NAME.tmp-PID) and
renamed into place only after its content was counted, so NAME either does
not exist or is complete. A run killed mid-copy leaves only the hidden temp
folder, which the next run removes (unless its process is still alive).
"""
import os
import re
import shutil
import zipfile

from . import PrepareError
from .verify import IMAGES_PER_CHARACTER, MAX_MEMBER_BYTES, PNG_MAGIC

READ_CHUNK = 1 << 16  # bytes unpacked at a time, so a huge member is refused before it is held whole
_LEFTOVER = re.compile(r"^\.(omniglot\w*)\.(tmp|old)-(\d+)$")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out_dir):
    """Remove temp/old folders of earlier runs that were interrupted."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        match = _LEFTOVER.match(name)
        if match and (int(match.group(3)) == os.getpid() or not _alive(int(match.group(3)))):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


def count(split_dir):
    """(characters, images, characters without exactly 20 PNGs) of a split folder.

    A folder that cannot be read or a symlink loop in it (DirEntry.is_dir raises on a loop) is a
    PrepareError naming the path, not a traceback.
    """
    chars = images = odd = 0
    try:
        for alphabet in os.scandir(split_dir):
            if not alphabet.is_dir():
                continue
            for char in os.scandir(alphabet.path):
                if char.is_dir():
                    n = sum(1 for f in os.scandir(char.path) if f.name.endswith(".png"))
                    chars, images, odd = chars + 1, images + n, odd + (n != IMAGES_PER_CHARACTER)
    except OSError as exc:
        raise PrepareError(f"{exc.filename or split_dir}: cannot read this folder ({exc.strerror or exc}); "
                           "remove or fix it and run again") from None
    return chars, images, odd


def is_complete(split_dir, n_chars):
    if not os.path.isdir(split_dir):
        return False
    chars, _, odd = count(split_dir)
    return chars == n_chars and odd == 0


def _write_file(path, data):
    # A module-level function so tests can interrupt a run in the middle of the copy.
    with open(path, "wb") as f:
        f.write(data)


def write_split(out_dir, folder, characters, sources, progress=None):
    """Copy characters [(alphabet, character)] from sources {key: (ZipFile, members)}.

    Layout: out_dir/folder/<alphabet>/<character>/<NNNN_DD>.png.
    """
    final = os.path.join(out_dir, folder)
    tmp = os.path.join(out_dir, f".{folder}.tmp-{os.getpid()}")
    old = os.path.join(out_dir, f".{folder}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for key in characters:
            zf, members = sources[key]
            char_dir = os.path.join(tmp, *key)
            # verify.list_characters refuses such names before anything is written; this is the last guard.
            if os.path.dirname(os.path.dirname(os.path.normpath(char_dir))) != tmp:
                raise PrepareError(f"{os.path.basename(zf.filename)}: character {'/'.join(key)} is outside {folder}")
            os.makedirs(char_dir)
            for member in members:
                data = _read(zf, member)
                _write_file(os.path.join(char_dir, member.rsplit("/", 1)[1]), data)
            if progress is not None:
                progress.update(1)
        chars, images, odd = count(tmp)  # count what was really unpacked
        if chars != len(characters) or odd:
            raise PrepareError(f"{folder}: unpacked {chars} characters / {images} images, "
                               f"expected {len(characters)} x {IMAGES_PER_CHARACTER}")
        if os.path.exists(final):  # an incomplete split from elsewhere: swap it out
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(zf, member):
    """The bytes of a PNG member, read in chunks and never more than MAX_MEMBER_BYTES of them: the size the
    archive declares was checked before anything was written, and what is unpacked is counted again here, as
    a forged header could declare less than the member holds."""
    archive = os.path.basename(zf.filename)
    chunks, size = [], 0
    try:
        with zf.open(member) as stream:
            while True:
                chunk = stream.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_MEMBER_BYTES:
                    raise PrepareError(f"{archive}: refusing {member}: it unpacks to more than {MAX_MEMBER_BYTES} "
                                       "bytes (verify.MAX_MEMBER_BYTES), whatever its header declares")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError(f"{archive}: cannot read {member} ({exc})") from None
    data = b"".join(chunks)
    if not data.startswith(PNG_MAGIC):
        raise PrepareError(f"{archive}: wrong content: {member} is not a PNG")
    return data
