"""Where the two Omniglot archives come from: the official GitHub copy or a mirror.

A mirror (OMNIGLOT_MIRROR) is a folder, a file:// URL or an http(s):// URL prefix
holding both archives. Local archives are read in place; remote ones are
downloaded into raw/ under a temporary name and renamed only when complete, so
an interrupted download never looks like a finished one.
"""
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from . import PrepareError

ARCHIVES = ("images_background.zip", "images_evaluation.zip")
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
# Seconds without an answer before a download is given up (offline machines
# should fail fast with a hint, not hang).
TIMEOUT = 30


def offline_hint():
    return ("offline? set OMNIGLOT_MIRROR to a folder or URL holding "
            f"{' and '.join(ARCHIVES)}, e.g. "
            "OMNIGLOT_MIRROR=/path/to/folder sh datasets/omniglot/run.sh")


def locate(raw_dir, environ=os.environ):
    """Return {archive name: local path}, downloading what is not local."""
    mirror = environ.get("OMNIGLOT_MIRROR", "").strip()
    if mirror and not mirror.startswith(("http://", "https://")):
        folder = mirror
        if mirror.startswith("file://"):
            folder = urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)
        return {name: _local(folder, name, mirror) for name in ARCHIVES}
    # OMNIGLOT_URL only exists so tests can point the default source at an
    # unreachable local address; users set OMNIGLOT_MIRROR instead.
    base = mirror or environ.get("OMNIGLOT_URL", "").strip() or OFFICIAL_URL
    paths = {}
    for name in ARCHIVES:
        dest = os.path.join(raw_dir, name)
        if not os.path.isfile(dest):  # a finished earlier download is reused
            os.makedirs(raw_dir, exist_ok=True)
            download(base.rstrip("/") + "/" + name, dest)
        paths[name] = dest
    return paths


def _local(folder, name, mirror):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise PrepareError(f"OMNIGLOT_MIRROR={mirror}: no {name} in {os.path.abspath(folder)}")
    if not os.path.isfile(path):  # a FIFO would block the archive's reading for ever
        raise PrepareError(f"OMNIGLOT_MIRROR={mirror}: {os.path.abspath(path)} is not a regular file "
                           "(a folder, FIFO, device or socket)")
    return path


def download(url, dest):
    """Fetch url into dest via dest.part, with a progress bar."""
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=None) as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    except urllib.error.HTTPError as exc:
        raise PrepareError(f"cannot download {url}: HTTP {exc.code}; {offline_hint()}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError,
            http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrepareError(f"cannot download {url} ({reason}); {offline_hint()}") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
