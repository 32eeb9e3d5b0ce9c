"""datasets/omniglot: fetching, verification, protocols, atomic re-runnable writes.

No test reaches the internet: the default URL is pointed at a closed local port
(OMNIGLOT_URL), mirrors are tmp folders or a local HTTP server, and the full run
uses the read-only mirror beside the repo (skipped when absent).
"""
import collections
import functools
import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP_DIR = os.path.join(REPO_ROOT, "datasets", "omniglot")
RUN_SH = os.path.join(PREP_DIR, "run.sh")
sys.path.insert(0, PREP_DIR)
import prepare  # noqa: E402
from omniglot_prep import protocols, splits, verify  # noqa: E402

SPLITS = {"omniglot_train": 973, "omniglot_valid": 325, "omniglot_test": 325}


def closed_port_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_prepare(*args, mirror=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGLOT_")}
    env.update(PYTHON=sys.executable, OMNIGLOT_URL=closed_port_url())  # never the internet
    if mirror is not None:
        env["OMNIGLOT_MIRROR"] = str(mirror)
    return subprocess.run(["sh", RUN_SH, *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def png_bytes(seed):
    img = Image.new("1", (105, 105), 1)
    img.putpixel((seed % 105, (seed * 7) % 105), 0)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def tiny_mirror(folder):
    """Both archives in the official layout, but far too small (2 alphabets x 2 characters)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as zf:
            for alphabet in (f"{name[7:]}_A", f"{name[7:]}_B"):
                for c in (1, 2):
                    for d in range(1, 21):
                        n += 1
                        zf.writestr(f"{name}/{alphabet}/character{c:02d}/{n:04d}_{d:02d}.png",
                                    png_bytes(n))
    return folder


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def split_entries(out):
    return sorted(n for n in os.listdir(out) if "omniglot" in n)


# ----- failures: one line, non-zero, nothing half-written -----
def test_offline_without_mirror_is_one_line(tmp_path):
    proc = run_prepare("--out", tmp_path / "out")
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "cannot download" in line and "OMNIGLOT_MIRROR" in line
    assert split_entries(tmp_path / "out") == []
    assert not any(n.endswith(".part") for n in os.listdir(tmp_path / "out" / "raw"))


def test_tiny_mirror_folder_is_wrong_content(tmp_path):
    mirror = tiny_mirror(tmp_path / "mirror")
    proc = run_prepare("--out", tmp_path / "out", mirror=mirror)
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "images_background.zip: wrong content" in line
    assert "expected 30 alphabets and 964 characters x 20 PNGs, found 2 alphabets and 4" in line
    assert split_entries(tmp_path / "out") == []


def test_tiny_mirror_file_url_is_wrong_content(tmp_path):
    mirror = tiny_mirror(tmp_path / "mirror")
    proc = run_prepare("--out", tmp_path / "out", mirror=mirror.as_uri())
    assert proc.returncode != 0
    assert "images_background.zip: wrong content" in one_line(proc.stderr)


def test_http_mirror_downloads_then_verifies(tmp_path):
    mirror = tiny_mirror(tmp_path / "mirror")
    handler = functools.partial(_QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        proc = run_prepare("--out", tmp_path / "out", mirror=url)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode != 0
    assert "images_background.zip: wrong content" in proc.stderr.splitlines()[-1]
    raw = tmp_path / "out" / "raw"
    # both downloads completed and were renamed from their .part names
    assert sorted(os.listdir(raw)) == ["images_background.zip", "images_evaluation.zip"]
    assert (raw / "images_background.zip").read_bytes() == (mirror / "images_background.zip").read_bytes()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_mirror_missing_file_is_one_line(tmp_path):
    proc = run_prepare("--out", tmp_path / "out", mirror=closed_port_url())
    assert proc.returncode != 0
    assert "cannot download" in one_line(proc.stderr)


def test_mirror_without_archives_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_prepare("--out", tmp_path / "out", mirror=tmp_path / "empty")
    assert proc.returncode != 0
    assert "no images_background.zip in" in one_line(proc.stderr)


def test_a_fifo_in_the_mirror_is_named_not_read(tmp_path):
    mirror = tiny_mirror(tmp_path / "mirror")
    os.remove(mirror / "images_evaluation.zip")
    os.mkfifo(mirror / "images_evaluation.zip")
    proc = run_prepare("--out", tmp_path / "out", mirror=mirror)  # run_prepare's timeout fails a hang
    assert proc.returncode != 0
    assert f"{mirror / 'images_evaluation.zip'} is not a regular file" in one_line(proc.stderr)


def test_not_a_zip_names_the_archive(tmp_path):
    mirror = tiny_mirror(tmp_path / "mirror")
    (mirror / "images_background.zip").write_bytes(b"<html>rate limited</html>")
    proc = run_prepare("--out", tmp_path / "out", mirror=mirror)
    assert proc.returncode != 0
    assert "images_background.zip: not a readable zip archive" in one_line(proc.stderr)


def test_stale_temp_folders_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead_pid = 4_999_999  # above Linux's largest pid_max: no such process
    (out / f".omniglot_train.tmp-{dead_pid}" / "Alpha" / "character01").mkdir(parents=True)
    (out / f".omniglot_valid.old-{dead_pid}").mkdir()
    proc = run_prepare("--out", out)  # offline: fails, but only after cleaning
    assert proc.returncode != 0
    assert split_entries(out) == []
    assert "left by an interrupted run" in proc.stdout


# ----- protocols (pure functions) -----
def fake_characters(prefix, n_alphabets, n_chars):
    per = -(-n_chars // n_alphabets)
    return [(f"{prefix}{i // per:02d}", f"character{i % per + 1:02d}") for i in range(n_chars)]


BACKGROUND = fake_characters("Bg", 30, 964)
EVALUATION = fake_characters("Ev", 20, 659)
# The background archive's alphabets and their numbers of characters (names and counts only, no drawings): Lake's
# validation split is drawn over these names, and PROTOCOLS["lake"].sizes must match the draw.
BACKGROUND_ALPHABETS = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
    "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55}
LAKE_BACKGROUND = [(alphabet, f"character{c:02d}") for alphabet, n in sorted(BACKGROUND_ALPHABETS.items())
                   for c in range(1, n + 1)]
LAKE_VALID = ["Arcadian", "Asomtavruli_(Georgian)", "Korean", "Syriac_(Estrangelo)", "Tifinagh"]


@pytest.mark.parametrize("name,sizes", [("paddlerec", (973, 325, 325)), ("vinyals", (1100, 100, 423)),
                                        ("lake", (780, 184, 659))])
def test_protocol_sizes_and_disjointness(name, sizes):
    protocol = protocols.PROTOCOLS[name]
    assigned = protocol.assign(list(LAKE_BACKGROUND if name == "lake" else BACKGROUND), list(EVALUATION))
    assert tuple(len(assigned[s]) for s in protocol.sizes) == sizes
    assert tuple(protocol.sizes.values()) == sizes
    merged = [c for s in assigned.values() for c in s]
    assert len(set(merged)) == len(merged) == 1623


def test_shuffled_protocol_ignores_listing_order():
    a = protocols.paddlerec(list(BACKGROUND), list(EVALUATION))
    b = protocols.paddlerec(list(reversed(BACKGROUND)), EVALUATION[::2] + EVALUATION[1::2])
    assert a == b


def alphabets(characters):
    return {alphabet for alphabet, _ in characters}


@pytest.mark.parametrize("background", [LAKE_BACKGROUND, BACKGROUND], ids=["official names", "other names"])
def test_lake_validates_on_whole_background_alphabets(background):
    assigned = protocols.lake(list(background), list(EVALUATION))
    assert assigned["test"] == sorted(EVALUATION)  # the evaluation alphabets test, and only they
    assert sorted(assigned["train"] + assigned["valid"]) == sorted(background)
    assert not alphabets(assigned["train"]) & alphabets(assigned["valid"])  # whole alphabets
    assert len(alphabets(assigned["valid"])) == 5
    sizes = collections.Counter(alphabet for alphabet, _ in assigned["valid"])
    assert min(sizes.values()) >= 20  # each allows 20-way within-alphabet validation tasks
    # the listing order does not matter
    assert protocols.lake(list(reversed(background)), EVALUATION[::-1]) == assigned


def test_lake_valid_alphabets_of_the_official_archive():
    assert protocols.lake_valid_alphabets(LAKE_BACKGROUND) == LAKE_VALID
    assigned = protocols.lake(LAKE_BACKGROUND, EVALUATION)
    assert {split: len(chars) for split, chars in assigned.items()} == protocols.PROTOCOLS["lake"].sizes
    # training keeps the four alphabets under 20 characters (config_omniglot_lake_20way_1shot.yaml leaves them out)
    assert len(alphabets(assigned["train"])) == 25


def test_folder_names():
    assert protocols.folder_name(protocols.PROTOCOLS["paddlerec"], "train") == "omniglot_train"
    assert protocols.folder_name(protocols.PROTOCOLS["vinyals"], "test") == "omniglot_vinyals_test"


def fake_mirror(folder, background, evaluation):
    """Both archives in the official layout with the given {alphabet: characters}, 20 tiny PNGs each."""
    folder.mkdir(parents=True, exist_ok=True)
    png = png_bytes(0)
    for name, layout in (("images_background", background), ("images_evaluation", evaluation)):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as zf:
            for alphabet, n in layout.items():
                for c in range(1, n + 1):
                    for d in range(1, 21):
                        zf.writestr(f"{name}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", png)
    return folder


def test_lake_split_prepared_before_valid_existed_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A folder holding Lake's old train split (every background alphabet) is written again, not mixed with valid."""
    background = {f"Bg_{letter}": 20 for letter in "ABCDEF"}
    background["Bg_small"] = 3
    evaluation = {"Ev_A": 2, "Ev_B": 2}
    monkeypatch.setenv("OMNIGLOT_MIRROR", str(fake_mirror(tmp_path / "mirror", background, evaluation)))
    monkeypatch.setattr(verify, "EXPECTED", {"images_background.zip": (7, 123), "images_evaluation.zip": (2, 4)})
    out = tmp_path / "out"
    # The protocol as it was: all background characters train, no valid.
    old = protocols.Protocol("lake", "omniglot_lake", {"train": 123, "test": 4},
                             lambda bg, ev: {"train": sorted(bg), "test": sorted(ev)})
    monkeypatch.setitem(protocols.PROTOCOLS, "lake", old)
    assert prepare.main(["--protocol", "lake", "--out", str(out)]) == 0
    assert split_entries(out) == ["omniglot_lake_test", "omniglot_lake_train"]
    test_mtime = os.stat(out / "omniglot_lake_test").st_mtime_ns
    capsys.readouterr()
    # Now: 5 of the 6 alphabets with 20 characters validate; the sizes are this archive's.
    new = protocols.Protocol("lake", "omniglot_lake", {"train": 23, "valid": 100, "test": 4}, protocols.lake)
    monkeypatch.setitem(protocols.PROTOCOLS, "lake", new)
    assert prepare.main(["--protocol", "lake", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"{out / 'omniglot_lake_train'}: 123 characters, expected 23: writing it again" in stdout
    assert "valid   100 characters   2000 images" in stdout and "train    23 characters    460 images" in stdout
    assert split_entries(out) == ["omniglot_lake_test", "omniglot_lake_train", "omniglot_lake_valid"]
    train, valid = (set(os.listdir(out / f"omniglot_lake_{split}")) for split in ("train", "valid"))
    assert len(valid) == 5 and len(train) == 2 and "Bg_small" in train and not train & valid
    assert len(characters(out / "omniglot_lake_train")) == 23
    assert os.stat(out / "omniglot_lake_test").st_mtime_ns == test_mtime  # complete: left as it was
    assert prepare.main(["--protocol", "lake", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out


# ----- the real mirror -----
# sha256 of the sorted "alphabet/character" lines of the paddlerec test split:
# pins the split, so a change in sorting/shuffling cannot slip through unnoticed.
PADDLEREC_TEST_SHA = "f09436dbe98173495e32948080bc4b89719760d340f3dc3ab2de61393e2293ec"


def characters(split_dir):
    return sorted(f"{a}/{c}" for a in os.listdir(split_dir) for c in os.listdir(os.path.join(split_dir, a)))


def test_real_mirror_full_run(omniglot_splits):
    out, proc = omniglot_splits
    assert split_entries(out) == sorted(SPLITS)
    seen = set()
    for folder, n_chars in SPLITS.items():
        chars = characters(out / folder)
        assert len(chars) == n_chars
        for char in chars:
            names = os.listdir(out / folder / char)
            assert len(names) == 20 and all(n.endswith(".png") for n in names)
        seen |= set(chars)
    assert len(seen) == 1623  # disjoint and complete
    assert "md5 af02123a84a003ad6572a03696efa473 (repacked mirror)" in proc.stdout
    assert "train   973 characters  19460 images" in proc.stdout
    digest = hashlib.sha256("\n".join(characters(out / "omniglot_test")).encode()).hexdigest()
    assert digest == PADDLEREC_TEST_SHA


def test_real_mirror_rerun_is_a_fast_noop(omniglot_splits, tmp_path):
    out, _ = omniglot_splits
    before = {f: os.stat(out / f).st_mtime_ns for f in SPLITS}
    (tmp_path / "empty_mirror").mkdir()
    start = time.monotonic()
    # Fast because it reads no archive: an empty mirror (and no internet) must do, from another cwd.
    proc = run_prepare("--out", out, mirror=tmp_path / "empty_mirror", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    print(f"rerun took {time.monotonic() - start:.1f} s")  # a figure, not an assertion: the machine may be loaded
    assert "already complete" in proc.stdout and "nothing to do" in proc.stdout
    assert {f: os.stat(out / f).st_mtime_ns for f in SPLITS} == before


def test_real_mirror_interrupted_copy_leaves_nothing(omniglot_mirror, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_write, calls = splits._write_file, []

    def write_then_interrupt(path, data):
        calls.append(path)
        if len(calls) == 500:  # inside the train split
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setenv("OMNIGLOT_MIRROR", omniglot_mirror)
    monkeypatch.setattr(splits, "_write_file", write_then_interrupt)
    assert prepare.main(["--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert split_entries(out) == []  # no split, no temp folder


def test_real_mirror_killed_run_is_cleaned_next_time(omniglot_mirror, tmp_path):
    """SIGKILL mid-copy: no split appears, and the next run removes the temp folder."""
    out = tmp_path / "out"
    env = dict(os.environ, OMNIGLOT_MIRROR=omniglot_mirror)
    proc = subprocess.Popen([sys.executable, os.path.join(PREP_DIR, "prepare.py"), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(n.startswith(".omniglot_train.tmp-") for n in os.listdir(out)):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert split_entries(out) == [n for n in split_entries(out) if n.startswith(".omniglot_train.tmp-")]
    # The next run (offline here, to keep the test light) cleans up before anything else.
    rerun = run_prepare("--out", out)
    assert "left by an interrupted run" in rerun.stdout
    assert split_entries(out) == []


def test_md5_note_knows_the_mirror(omniglot_mirror):
    note = verify.md5_note("images_evaluation.zip", os.path.join(omniglot_mirror, "images_evaluation.zip"))
    assert note.endswith("(repacked mirror)")
