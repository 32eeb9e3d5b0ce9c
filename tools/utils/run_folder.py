"""One trainer per run folder (runner.model_save_path), and one run per folder.

- lock_run_folder(): an exclusive flock on <folder>/.trainer.lock, held for
  the life of the process. The file records the holder (pid, host, start) so
  a second trainer can say who has the folder. The kernel drops the lock when
  its process dies however it dies, so a lock file left by a dead trainer is
  simply taken over (and the takeover is reported). A clean exit removes it.
- remove_stale_staging(): the hidden folders and files an interrupted save
  leaves (.<epoch>.saving-*, .<epoch>.old-*, .best.json.*.tmp); only safe
  while holding the lock, since a live trainer's saves look the same.
- replace_old_run(): a fresh start refuses a folder that holds checkpoints
  unless runner.overwrite is set; then the old run's files are first moved
  into one hidden folder, then deleted, so no part of it stays in use.
"""
import atexit
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time

from tools.utils.console import log, warn
from tools.utils.errors import UserError

LOCK_FILE = ".trainer.lock"
_STAGING = re.compile(r"^\.(\d+\.(saving|old)-.*|best\.json\..*\.tmp|replaced-.*)$")
# What a training run writes into its folder besides the epoch folders.
RUN_FILES = ("metrics.jsonl", "best.json", "infer_metrics.jsonl")


def _holder(descriptor) -> str:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 300).decode("utf-8", "replace")
    return " ".join(text.split())[:200]  # written by another process: one printable line at most


def lock_run_folder(folder):
    """Hold <folder>/.trainer.lock until this process ends (warns when a dead holder's lock is taken over).

    Raises a UserError naming the folder and the holder when a live process has it.
    """
    path = os.path.join(folder, LOCK_FILE)
    created = []  # folders made here, removed again at exit when the run wrote nothing into them
    parent = folder
    while parent and not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(descriptor) or "a process that has not written its name yet"
                os.close(descriptor)
                raise UserError(f"{folder}: in use by another trainer ({holder}); wait for it to end or choose "
                                "another runner.model_save_path") from None
            try:  # the previous holder may have removed the file between our open and flock
                if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        previous = _holder(descriptor)
        record = f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, record.encode("utf-8"), 0)
    except OSError as reason:
        raise UserError(f"{path}: cannot lock the run folder: {reason.strerror}") from None
    atexit.register(_release, path, descriptor, created)
    if previous:
        warn(f"{folder}: took over the lock of {previous} (that trainer is no longer running)")


def _release(path, descriptor, created):
    try:
        os.remove(path)  # while still holding it: the next trainer then starts from a clean folder
    except OSError:
        pass
    os.close(descriptor)
    for folder in created:
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            break


def remove_stale_staging(folder):
    """Remove (and log) what interrupted saves left in `folder`."""
    if not os.path.isdir(folder):
        return
    removed = sorted(name for name in os.listdir(folder) if _STAGING.match(name))
    for name in removed:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    if removed:
        log(f"{folder}: removed what interrupted saves left: {', '.join(removed)}")


def old_run_entries(folder) -> list:
    """The entries of a finished or interrupted run in `folder`: epoch folders and RUN_FILES."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if (name.isascii() and name.isdigit() and os.path.isdir(os.path.join(folder, name)))
                  or name in RUN_FILES)


def replace_old_run(folder, overwrite, key="runner.overwrite"):
    """Before a fresh start: refuse a folder with checkpoints, or with `overwrite` remove the old run."""
    entries = old_run_entries(folder)
    epochs = sorted((name for name in entries if name.isdigit()), key=int)
    if not epochs:
        return
    if not overwrite:
        raise UserError(f"{folder}: holds the checkpoints of another run (epochs {', '.join(epochs)}); "
                        f"resume it with runner.resume_path=auto, or replace it with {key}=True")
    moved = []
    try:
        aside = tempfile.mkdtemp(prefix=".replaced-", dir=folder)
        for name in entries:
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
            moved.append(name)
    except BaseException as reason:  # put back what was moved: the old run stays whole or goes whole
        for name in moved:
            os.replace(os.path.join(aside, name), os.path.join(folder, name))
        if isinstance(reason, OSError):
            raise UserError(f"{folder}: cannot move the old run aside: {reason.strerror}") from None
        raise
    shutil.rmtree(aside, ignore_errors=True)  # an interrupted removal is finished by remove_stale_staging
    log(f"{folder}: removed the old run ({', '.join(entries)}) as {key}=True asks")
