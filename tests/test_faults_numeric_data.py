"""Faults in numbers and in data, through the real tools: a NaN or infinite loss, gradient or
parameter stops training with one line and writes no checkpoint of it; a hostile data archive (a zip bomb
member included) writes nothing; a symlink loop, an unreadable folder or a FIFO in a data tree is one line
naming the path; no progress bar reaches a log file.

Every subprocess has a timeout (tests/tool_helpers.run_tool, or its own): the defects these tests pin
down used to hang."""
import datetime
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import paddle
import pytest

from tests.tool_helpers import REPO_ROOT, TOY_CONFIG, TOY_DIR, assert_ok, assert_user_error, run_tool
from tools.utils.console import UserError
from tools.utils.metrics import MetricsLog, NonFiniteError, NumericGuard, likely_causes, read_metrics
from tools.utils.plugin import plugin_declaration

MAML_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")
MAML_SMALL = ["runner.tasks_per_epoch=8", "runner.train_batch_size=8", "runner.infer_tasks=10",
              "runner.infer_batch_size=10"]
TOY_KEYS = '\nNON_FINITE_KEYS = {"hyper_parameters.optimizer.learning_rate": "the learning rate"}\n'


def epoch_folders(out):
    return sorted(name for name in os.listdir(out) if name.isdigit()) if os.path.isdir(out) else []


def train(config, out, *overrides, timeout=120, env=None):
    command = [sys.executable, "-u", os.path.join(REPO_ROOT, "tools", "trainer.py"), "-m", str(config), "-o",
               f"runner.model_save_path={out}", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))


def toy_with_keys(tmp_path):
    """A copy of the toy plugin that declares NON_FINITE_KEYS, like the MAML plugin does."""
    plugin = tmp_path / "toy"
    shutil.copytree(TOY_DIR, plugin, ignore=shutil.ignore_patterns("output_*", "__pycache__"))
    with open(plugin / "dygraph_model.py", "a", encoding="utf-8") as handle:
        handle.write(TOY_KEYS)
    return plugin / "config.yaml"


# ------------------------------------------------------------------------------------ numerical faults
@pytest.mark.parametrize("rate, env, shown", [
    # The command, on Paddle's NCHW kernels: it used to save a NaN epoch 0, then corrupt the heap (the
    # max-pool index of a NaN window) and hang. oneDNN's kernels on blocked activations, the default on a CPU
    # that has them, keep this rate's loss finite (it is ~5e5: no error to give), so it runs with them off.
    ("1e6", {"MAML_ONEDNN_BLOCKED": "0"}, "now 1000000.0"),
    ("1e20", None, "now 1e+20"),  # the default path, at a rate that overflows float32 on any path
])
def test_maml_huge_inner_rate_stops_at_the_first_nan_without_hang_or_checkpoint(tmp_path, rate, env, shown):
    out = tmp_path / "out"
    process = train(MAML_CONFIG, out, *MAML_SMALL, "runner.epochs=2",
                    f"hyper_parameters.base_optimizer.learning_rate={rate}", timeout=240, env=env)
    line = assert_user_error(process, "epoch 0, batch 0", "the loss is nan",
                             "hyper_parameters.base_optimizer.learning_rate", shown,
                             "hyper_parameters.meta_optimizer.learning_rate")
    assert "nothing of epoch 0 saved" in line
    assert epoch_folders(out) == []


def test_nan_loss_stops_before_the_update_and_saves_nothing(tmp_path):
    out = tmp_path / "out"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                       "hyper_parameters.optimizer.class=SGD", "hyper_parameters.optimizer.learning_rate=1e38")
    assert_user_error(process, "epoch 0, batch 1: the loss is nan", "check the learning rate(s) and the data")
    assert epoch_folders(out) == []


def test_nan_after_resume_keeps_the_good_checkpoints_and_names_the_plugins_keys(tmp_path):
    config, out = toy_with_keys(tmp_path), tmp_path / "out"
    assert_ok(train(config, out, "runner.epochs=1"))
    process = train(config, out, "runner.epochs=3", "runner.resume_path=auto",
                    "hyper_parameters.optimizer.learning_rate=1e38")
    assert_user_error(process, "epoch 1, batch 1: the loss is nan", "nothing of epoch 1 saved",
                      "hyper_parameters.optimizer.learning_rate (the learning rate, now 1e+38)")
    assert epoch_folders(out) == ["0"]
    state = paddle.load(str(out / "0" / "rec.pdparams"))
    assert all(np.isfinite(value.numpy()).all() for value in state.values())


def test_parameters_overflowing_in_the_last_update_are_never_saved(tmp_path):
    """One batch per epoch: the loss and gradients are finite, the update makes the weights non-finite."""
    out = tmp_path / "out"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                       "runner.tasks_per_epoch=32", "hyper_parameters.optimizer.class=SGD",
                       "hyper_parameters.optimizer.learning_rate=1e39")
    assert_user_error(process, "epoch 0: parameter", "is not finite", "its checkpoint is not written")
    assert epoch_folders(out) == []


class _Tiny(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.first = paddle.nn.Linear(3, 3)
        self.second = paddle.nn.Linear(3, 1)

    def forward(self, x):
        return self.second(self.first(x))


def _tiny_with_gradients(scale):
    paddle.seed(0)
    model = _Tiny()
    (model(paddle.ones([2, 3])).sum() * scale).backward()
    return model


def test_guard_names_the_parameter_whose_gradient_is_not_finite():
    guard = NumericGuard("check x", warn=lambda message: None)
    model = _tiny_with_gradients(1.0)
    guard.check_batch(1.0, model, 0, 0)  # finite: passes
    model.first.weight.grad.set_value(paddle.full([3, 3], float("inf")))
    with pytest.raises(NonFiniteError, match=r"epoch 2, batch 5: the gradient of first.weight is not finite.*check x"):
        guard.check_batch(0.5, model, 2, 5)


def test_guard_has_no_false_alarm_on_huge_finite_values():
    """The probe multiplies by zero before summing: a norm or a sum of 3e38s would overflow to inf."""
    guard = NumericGuard("check x", warn=lambda message: None)
    model = _tiny_with_gradients(1e37)
    for parameter in model.parameters():
        parameter.set_value(paddle.full(parameter.shape, 3e38))
    guard.check_batch(1e30, model, 0, 0)
    guard.check_parameters(model, 0)
    model.second.bias.set_value(paddle.to_tensor([float("nan")]))
    with pytest.raises(NonFiniteError, match="epoch 0: parameter second.bias is not finite"):
        guard.check_parameters(model, 0)


def test_guard_warns_once_when_the_loss_explodes_but_stays_finite():
    warnings = []
    guard = NumericGuard("check x", warn=warnings.append)
    model = _tiny_with_gradients(1.0)
    for batch, loss in enumerate([1.5, 3.0, 2e5, 7e12, 1e13]):
        guard.check_batch(loss, model, 0, batch)
    assert len(warnings) == 1 and "batch 2: the loss is 2e+05, up from 1.5" in warnings[0], warnings


def test_plugin_non_finite_keys_are_checked_and_formatted():
    class Module:
        __file__ = "plugin.py"

    assert plugin_declaration(Module, "NON_FINITE_KEYS") == {}
    Module.NON_FINITE_KEYS = {"a.b": "the rate"}
    assert likely_causes({"a.b": 0.5}, plugin_declaration(Module, "NON_FINITE_KEYS")) == "check a.b (the rate, now 0.5)"
    Module.NON_FINITE_KEYS = ["a.b"]
    with pytest.raises(UserError, match="plugin.py: NON_FINITE_KEYS must be a dict"):
        plugin_declaration(Module, "NON_FINITE_KEYS")


# ----------------------------------------------------------------------------------------- data archives
PREP_DIR = os.path.join(REPO_ROOT, "datasets", "omniglot")
if PREP_DIR not in sys.path:
    sys.path.insert(0, PREP_DIR)
from omniglot_prep import verify  # noqa: E402

MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
if MAML_DIR not in sys.path:
    sys.path.insert(0, MAML_DIR)
import omniglot_reader  # noqa: E402


def _png():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buffer, "PNG")
    return buffer.getvalue()


def _write_archive(path, name, rename=lambda member: member, extra=()):
    """An archive with the official counts (alphabets, characters, 20 PNGs each) of one tiny synthetic
    PNG, so it passes the count check; `rename` and `extra` ((ZipInfo, data), ...) make it hostile."""
    alphabets, characters = verify.EXPECTED[f"{name}.zip"]
    png = _png()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for c in range(characters):
            for d in range(1, verify.IMAGES_PER_CHARACTER + 1):
                # Alphabets named after the archive: the two archives must not share a character.
                member = f"{name}/{name[7:].title()}_{c % alphabets:02d}/character{c:03d}/{c:04d}_{d:02d}.png"
                archive.writestr(rename(member), png)
        for info, data in extra:
            archive.writestr(info, data)


@pytest.fixture(scope="module")
def good_background(tmp_path_factory):
    path = tmp_path_factory.mktemp("archives") / "images_background.zip"
    _write_archive(path, "images_background")
    return path


def _symlink_member(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)  # S_IFLNK | rwxrwxrwx, as `zip --symlinks` stores a link
    return info, target


HOSTILE = {
    # the case: one alphabet folder renamed to `..` (the counts still match)
    "dot-dot alphabet": dict(rename=lambda m: m.replace("/Evaluation_03/", "/../")),
    "absolute path": dict(extra=[(zipfile.ZipInfo("/tmp/omniglot_escape/evil.png"), b"x")]),
    "symlink entry": dict(rename=lambda m: m.replace("0005_20.png", "0005_20.orig"),
                          extra=[_symlink_member("images_evaluation/Evaluation_05/character005/0005_20.png",
                                                 "../../../../../etc/passwd")]),
}
EXPECTED_MEMBER = {"dot-dot alphabet": "images_evaluation/../character003/0003_01.png",
                   "absolute path": "/tmp/omniglot_escape/evil.png",
                   "symlink entry": "images_evaluation/Evaluation_05/character005/0005_20.png"}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_archive_writes_nothing_and_names_the_member(case, good_background, tmp_path):
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    mirror.mkdir()
    out.mkdir()
    shutil.copy(good_background, mirror / "images_background.zip")
    _write_archive(mirror / "images_evaluation.zip", "images_evaluation", **HOSTILE[case])
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGLOT_")}
    env.update(PYTHON=sys.executable, OMNIGLOT_MIRROR=str(mirror))
    process = subprocess.run(["sh", os.path.join(PREP_DIR, "run.sh"), "--out", str(out)], env=env,
                             capture_output=True, text=True, timeout=300)
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1, process.stderr[-2000:]
    assert lines[0].startswith("prepare.py: error: images_evaluation.zip: refusing"), lines[0]
    assert repr(EXPECTED_MEMBER[case]) in lines[0], lines[0]
    assert os.listdir(out) == [], os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["mirror", "out"]
    assert not os.path.exists("/tmp/omniglot_escape")


def _run_prepare(mirror, out, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGLOT_")}
    env.update(PYTHON=sys.executable, OMNIGLOT_MIRROR=str(mirror))
    return subprocess.run(["sh", os.path.join(PREP_DIR, "run.sh"), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=300)


BOMB_MEMBER = "images_background/Background_05/character005/0005_20.png"


def _bomb():
    """(ZipInfo, data) of a PNG member of 3 MiB, three times the cap (zeros after the PNG signature: a few KB
    packed)."""
    info = zipfile.ZipInfo(BOMB_MEMBER)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info, b"\x89PNG\r\n\x1a\n" + bytes(3 << 20)


def _forge_sizes(path, declared):
    """Make the last member's local and central headers declare `declared` unpacked bytes (a lying header)."""
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    local = data.rfind(b"PK\x03\x04", 0, central)  # and its local header
    data[central + 24:central + 28] = declared.to_bytes(4, "little")
    data[local + 22:local + 26] = declared.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("header", ["honest", "forged"])
def test_a_zip_bomb_member_is_refused_naming_it_and_writes_nothing(header, tmp_path):
    """The declared size is refused before anything is read; a header declaring 1000 bytes is caught unpacking."""
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    mirror.mkdir()
    out.mkdir()
    _write_archive(mirror / "images_background.zip", "images_background",
                   rename=lambda m: m.replace("0005_20.png", "0005_20.orig"), extra=[_bomb()])
    if header == "forged":
        _forge_sizes(mirror / "images_background.zip", 1000)
    _write_archive(mirror / "images_evaluation.zip", "images_evaluation")
    # lake: the background archive is the train split, written first; so nothing at all may be written
    process = _run_prepare(mirror, out, "--protocol", "lake")
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1, process.stderr[-2000:]
    assert lines[0].startswith("prepare.py: error: images_background.zip: "), lines[0]
    assert BOMB_MEMBER in lines[0], lines[0]
    assert ("declares 3145736 bytes unpacked" if header == "honest" else "Bad CRC-32") in lines[0], lines[0]
    assert os.listdir(out) == [], os.listdir(out)


def test_the_unpacked_bytes_are_counted_whatever_the_header_says(tmp_path):
    """The copy counts what it unpacks, in bounded chunks, and stops once past the cap: the guard for a member
    that unpacks to more than its header declares (zipfile stops at the declared size; it need not)."""
    from omniglot_prep import PrepareError, splits

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(*_bomb())
    reads = []

    class Recording(zipfile.ZipFile):
        def open(self, member, *args, **kwargs):  # records the size of every read
            stream = super().open(member, *args, **kwargs)
            real_read = stream.read
            stream.read = lambda n=-1: (reads.append(n), real_read(n))[1]
            return stream

    with Recording(path) as archive:
        with pytest.raises(PrepareError, match=rf"^a.zip: refusing {BOMB_MEMBER}: it unpacks to more than "):
            splits._read(archive, BOMB_MEMBER)
    assert reads and all(0 < n <= splits.READ_CHUNK for n in reads)
    assert len(reads) * splits.READ_CHUNK <= verify.MAX_MEMBER_BYTES + splits.READ_CHUNK


@pytest.mark.parametrize("name, info_mode, reason", [
    ("images_background/A/c/x.png", 0o100644, None),
    ("images_background/A/c/", 0o040755, None),
    ("images_background/A/c/x.png", 0, None),  # an archiver that stores no Unix mode
    ("images_background/A/./x.png", 0o100644, "'..', '.' or empty path part"),
    ("images_background//c/x.png", 0o100644, "'..', '.' or empty path part"),
    ("images_background/A\\..\\..\\x.png", 0o100644, "backslash"),
    ("C:/images_background/A/c/x.png", 0o100644, "absolute path"),
    ("images_evaluation/A/c/x.png", 0o100644, "outside the archive's folder images_background/"),
    ("images_background/A/c/fifo.png", 0o010644, "symbolic link or special file"),
    ("images_background/A/c/dev.png", 0o060644, "symbolic link or special file"),
    ("images_background/A/c/big.png", 0o100644, "declares 1048577 bytes unpacked"),
])
def test_every_member_is_checked(name, info_mode, reason):
    info = zipfile.ZipInfo(name)
    info.external_attr = info_mode << 16
    info.file_size = 1048577 if "big" in name else 1000
    found = verify.unsafe_member_reason(info, "images_background")
    assert (found is None) if reason is None else (reason in found), found


# ---------------------------------------------------------------------------------------- data trees
READER_CONFIG = {"hyper_parameters.n_way": 2, "hyper_parameters.k_spt": 1, "hyper_parameters.k_query": 1,
                 "hyper_parameters.imgsize": 28, "runner.tasks_per_epoch": 4, "runner.train_batch_size": 2}


def _tree(root):
    for group in ("g1", "g2"):
        for char in ("c1", "c2"):
            folder = root / group / char
            folder.mkdir(parents=True)
            for k in range(2):
                (folder / f"{k}.png").write_bytes(_png())
    return sorted(str(root / name) for name in os.listdir(root))


@pytest.mark.parametrize("where", ["group", "image", "character"])
def test_a_symlink_loop_in_the_data_tree_is_one_error_naming_it(where, tmp_path):
    root = tmp_path / "train"
    _tree(root)
    loop = {"group": root / "loop", "character": root / "g1" / "loop", "image": root / "g2" / "c1" / "loop.png"}[where]
    os.symlink(loop.name + ".other", loop)
    os.symlink(loop.name, loop.parent / (loop.name + ".other"))
    # Either link of the pair may be met first: both are the loop.
    with pytest.raises(ValueError, match=rf"^{loop}(\.other)?: cannot read this part of the data tree \(Too many levels"):
        omniglot_reader.RecDataset(sorted(str(root / name) for name in os.listdir(root)), READER_CONFIG)


def test_a_symlink_loop_through_the_trainer_is_one_line(tmp_path):
    data = tmp_path / "train"
    shutil.copytree(os.path.join(MAML_DIR, "data", "train"), data)
    os.symlink("x.png", data / "alphabet_01" / "character01" / "x.png")
    process = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       f"runner.train_data_dir={data}", *MAML_SMALL)
    assert_user_error(process, f"{data}/alphabet_01/character01/x.png", "cannot read this part of the data tree")


def test_a_fifo_in_the_data_tree_is_one_line_through_the_trainer_not_a_hang(tmp_path):
    data = tmp_path / "train"
    shutil.copytree(os.path.join(MAML_DIR, "data", "train"), data)
    os.mkfifo(data / "alphabet_01" / "character01" / "0001_99.png")
    process = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       f"runner.train_data_dir={data}", *MAML_SMALL)  # run_tool's timeout fails a hang
    assert_user_error(process, f"{data}/alphabet_01/character01/0001_99.png", "not a regular file")


def test_a_log_file_gets_no_progress_bar_before_the_error_line(tmp_path):
    """stderr to a file: the decoding bar's carriage returns would leave `error:` mid-line for grep '^error:'."""
    data = tmp_path / "train"
    shutil.copytree(os.path.join(MAML_DIR, "data", "train"), data)
    last = sorted(data.glob("*/*/*.png"))[-1]
    last.write_bytes(b"not an image")  # decoded last: the bar has been drawn when the error comes
    with open(tmp_path / "log", "w+", newline="") as log:  # newline="": keep any \r as it is
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "trainer.py"), "-m", MAML_CONFIG, "-o",
                        f"runner.model_save_path={tmp_path / 'out'}", f"runner.train_data_dir={data}", *MAML_SMALL],
                       cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, timeout=120)
        log.seek(0)
        text = log.read()
    assert "\r" not in text, repr(text[-500:])
    assert text.splitlines()[-1].startswith("error: ") and f"{last}: cannot decode image" in text, text


def test_every_progress_bar_is_drawn_on_a_terminal_only():
    """One rule for every tqdm bar in the project: tqdm's disable=None (no bar when the stream is not a terminal)
    or an explicit value; tqdm's own default draws on any stream, a log file included."""
    import ast

    unset = []
    for folder in ("tools", "models", "datasets"):
        for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
            for name in (n for n in files if n.endswith(".py")):
                path = os.path.join(root, name)
                with open(path) as source:
                    tree = ast.parse(source.read(), path)
                for node in ast.walk(tree):
                    func = getattr(node, "func", None)
                    called = getattr(func, "id", None) or getattr(func, "attr", None)
                    if called == "tqdm" and not any(k.arg == "disable" for k in node.keywords):
                        unset.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
    assert unset == [], f"tqdm bars without disable=: {unset}"


def _refuse(blocked):
    """os.scandir / os.listdir that raise PermissionError on `blocked`, as for a non-root user on a
    chmod 000 folder (the tests run as root, whom chmod does not stop)."""
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path="."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def listdir(path="."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_listdir(path)

    return scandir, listdir


@pytest.mark.parametrize("part", ["g1", "g2/c2"])
def test_an_unreadable_folder_in_the_data_tree_is_one_error_naming_it(part, tmp_path, monkeypatch):
    root = tmp_path / "train"
    file_list = _tree(root)
    scandir, _ = _refuse(root / part)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ValueError, match=rf"^{root / part}: cannot read this part of the data tree \(Permission denied\)$"):
        omniglot_reader.RecDataset(file_list, READER_CONFIG)


def test_an_unreadable_data_folder_is_one_user_error(tmp_path, monkeypatch):
    from tools.utils.config import load_config
    from tools.utils.plugin import list_data_files

    root = tmp_path / "train"
    _tree(root)
    _, listdir = _refuse(root)
    monkeypatch.setattr(os, "listdir", listdir)
    config = load_config(MAML_CONFIG, [f"runner.train_data_dir={root}"])
    with pytest.raises(UserError, match=rf"runner.train_data_dir: cannot read data folder {root}: Permission denied"):
        list_data_files(config, "runner.train_data_dir")


def test_an_unreadable_or_looping_split_folder_is_one_prepare_error(tmp_path, monkeypatch):
    from omniglot_prep import PrepareError, splits

    split = tmp_path / "omniglot_train"
    (split / "A" / "c").mkdir(parents=True)
    os.symlink("loop", split / "A" / "loop")
    with pytest.raises(PrepareError, match=rf"^{split / 'A' / 'loop'}: cannot read this folder \(Too many levels"):
        splits.count(str(split))
    os.remove(split / "A" / "loop")
    scandir, _ = _refuse(split / "A" / "c")
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PrepareError, match=rf"^{split / 'A' / 'c'}: cannot read this folder \(Permission denied"):
        splits.count(str(split))


def test_a_metrics_record_holds_any_value_a_yaml_config_gives(tmp_path):
    """Records carry config values (a plugin's recorded settings): a YAML date is no JSON number or string."""
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    log.write("infer", {"settings": {"hyper_parameters.when": datetime.date(2026, 12, 7)}}, {"acc": float("nan")})
    log.close()
    (record,) = read_metrics(path)
    assert record["settings"] == {"hyper_parameters.when": "2026-12-07"} and record["acc"] is None
