"""hyper_parameters.task_sampling: within_alphabet (Lake et al.'s one-shot task): every task's classes come from
one alphabet, chosen in proportion to its classes; alphabets with fewer than n_way classes are an error unless
skip_small_alphabets leaves them out; tasks stay a function of (seed, mode, epoch, index); and the shipped
config_omniglot_lake_20way_1shot.yaml trains and evaluates on real Omniglot."""
import collections
import hashlib
import logging
import os
import zipfile

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.maml_modules import load
from tests.test_reader import config, entries, make_tree  # the reader tests' config dict and tiny-tree builder
from tests.tool_helpers import assert_ok, assert_user_error, run_tool
import omniglot_reader  # noqa: E402  (tests.test_reader put the model folder on sys.path)
from omniglot_reader import RecDataset, _mode_key  # noqa: E402
from tools.utils.config import load_config  # noqa: E402

MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
LAKE_20WAY = os.path.join(MAML_DIR, "config_omniglot_lake_20way_1shot.yaml")
WITHIN = {"hyper_parameters__task_sampling": "within_alphabet"}
# Three alphabets of 3, 6 and 9 characters (4 drawings each, 28 px: cheap to decode).
LAYOUT = {name: {f"character{c:02d}": 4 for c in range(chars)} for name, chars in
          (("Alpha", 3), ("Beta", 6), ("Gamma", 9))}


def small(**overrides):
    return config(**{"hyper_parameters__n_way": 3, "hyper_parameters__k_query": 2, **overrides})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("alphabets") / "train", LAYOUT, size=28)


def alphabet_of(ds, cls):
    per_class = 4 if ds.rotations else 1
    return os.path.basename(os.path.dirname(ds.class_dirs[int(cls) // per_class]))


def alphabets_of(ds, episode):
    return {alphabet_of(ds, c) for c in np.concatenate([episode.spt_classes, episode.qry_classes])}


# ----- what a task holds -----
@pytest.mark.parametrize("mode", ["train", "valid", "infer"])
def test_every_task_takes_its_classes_from_one_alphabet(tree, mode):
    ds = RecDataset(entries(tree), small(**WITHIN), mode)
    assert ds.task_sampling == "within_alphabet" and ds.sampled_alphabets == ["Alpha", "Beta", "Gamma"]
    for i in range(200):
        ep = ds.episode(0, i)
        assert len(alphabets_of(ds, ep)) == 1, i
        # labels, shots and queries as with "any": each class once in support, twice in query, one label each
        assert len(set(ep.spt_classes.tolist())) == 3
        assert np.bincount(ep.y_spt, minlength=3).tolist() == [1] * 3
        assert np.bincount(ep.y_qry, minlength=3).tolist() == [2] * 3
        mapping = dict(zip(ep.spt_classes.tolist(), ep.y_spt.tolist()))
        assert all(mapping[c] == y for c, y in zip(ep.qry_classes.tolist(), ep.y_qry.tolist()))
        assert not set(ep.spt_images.tolist()) & set(ep.qry_images.tolist())
        for images, classes in ((ep.spt_images, ep.spt_classes), (ep.qry_images, ep.qry_classes)):
            for image, cls in zip(images, classes):
                assert ds.image_paths[image].startswith(ds.class_dirs[cls] + os.sep)
    x_spt, y_spt, x_qry, y_qry = ds.task(0, 0)
    assert x_spt.shape == (3, 1, 28, 28) and x_qry.shape == (6, 1, 28, 28) and y_qry.dtype == np.int64


def test_any_mixes_alphabets(tree):
    ds = RecDataset(entries(tree), small())  # the default: "any"
    assert ds.task_sampling == "any"
    assert any(len(alphabets_of(ds, ds.episode(0, i))) > 1 for i in range(20))


def test_an_alphabet_is_chosen_in_proportion_to_its_classes(tree):
    ds = RecDataset(entries(tree), small(**WITHIN))
    tasks = 3000
    task_alphabets = [alphabets_of(ds, ds.episode(0, i)) for i in range(tasks)]
    assert all(len(names) == 1 for names in task_alphabets)
    chosen = collections.Counter(names.pop() for names in task_alphabets)
    # 3 : 6 : 9 characters -> 1/6, 2/6, 3/6 of the tasks (binomial sd <= 0.01; uniform would give 1/3 each)
    for name, share in (("Alpha", 1 / 6), ("Beta", 2 / 6), ("Gamma", 3 / 6)):
        assert abs(chosen[name] / tasks - share) < 0.03, chosen
    # so every class is in a task as often as with "any": n_way / 18 of the tasks
    per_class = collections.Counter(c for i in range(tasks) for c in ds.episode(0, i).spt_classes.tolist())
    assert len(per_class) == 18
    assert all(abs(n / tasks - 3 / 18) < 0.03 for n in per_class.values()), per_class


def test_rotated_copies_are_classes_of_their_alphabet(tree):
    # n_way 5: Alpha's 3 characters are too few, its 12 rotated classes are enough
    cfg = small(hyper_parameters__n_way=5, hyper_parameters__rotations=True, **WITHIN)
    ds = RecDataset(entries(tree), cfg)
    assert ds.sampled_alphabets == ["Alpha", "Beta", "Gamma"]
    seen = set()
    for i in range(100):
        ep = ds.episode(0, i)
        assert len(alphabets_of(ds, ep)) == 1
        seen |= alphabets_of(ds, ep)
        assert ep.spt_classes.max() < ds.num_classes
    assert seen == {"Alpha", "Beta", "Gamma"}
    with pytest.raises(ValueError, match=r"Alpha \(3\)"):
        RecDataset(entries(tree), dict(cfg, **{"hyper_parameters.rotations": False}))


# ----- determinism and sharding -----
def test_a_task_is_a_function_of_seed_epoch_and_index(tree):
    a = RecDataset(entries(tree), small(**WITHIN))
    b = RecDataset(entries(tree), small(**WITHIN))
    assert a.task_sampling == "within_alphabet"
    for i in (0, 5, 17):
        for x, y in zip(a.task(3, i), b.task(3, i)):
            np.testing.assert_array_equal(x, y)
    assert [a.episode(0, i).spt_classes.tolist() for i in range(10)] != \
        [a.episode(1, i).spt_classes.tolist() for i in range(10)]
    other = RecDataset(entries(tree), small(runner__seed=7, **WITHIN))
    assert [a.episode(0, i).spt_classes.tolist() for i in range(10)] != \
        [other.episode(0, i).spt_classes.tolist() for i in range(10)]


def test_two_ranks_split_each_batch_of_the_single_process_tasks(tree):
    cfg = small(runner__tasks_per_epoch=20, **WITHIN)  # batches of 8: 8, 8 and a partial 4
    assert RecDataset(entries(tree), cfg).task_sampling == "within_alphabet"
    single = [t[3].tolist() for t in RecDataset(entries(tree), cfg)]
    r0 = [t[3].tolist() for t in RecDataset(entries(tree), cfg).shard(0, 2)]
    r1 = [t[3].tolist() for t in RecDataset(entries(tree), cfg).shard(1, 2)]
    rebuilt = []
    for b, per_rank in enumerate((4, 4, 2)):
        rebuilt += r0[b * 4:b * 4 + per_rank] + r1[b * 4:b * 4 + per_rank]
    assert len(single) == 20 and rebuilt == single


def episodes_digest(ds):
    digest = hashlib.sha256()
    for epoch in range(2):
        for index in range(50):
            for array in ds.episode(epoch, index):
                digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("rotations, expected", [
    (False, "cfd9e55b0ced7e07d9a467073e39667843a18905e9159af3f253d76b30c42c45"),
    (True, "a6a419544f04eb9f2afa0ae127e0114f8dcc8ebd6b57f3d5dd4504a6a43da804")])
def test_any_draws_the_tasks_it_drew_before_the_option_existed(rotations, expected):
    # Digests of the reader before task_sampling (commit 037e17d) on the committed sample: runs begun then
    # resume bit-identically, and a config without the key trains on the same tasks as before.
    sample = os.path.join(MAML_DIR, "data", "train")
    cfg = config(hyper_parameters__rotations=rotations, runner__tasks_per_epoch=None, runner__train_batch_size=None)
    assert episodes_digest(RecDataset(entries(sample), cfg)) == expected


# ----- too-small alphabets and bad values -----
def test_an_alphabet_with_fewer_classes_than_n_way_is_named(tree):
    with pytest.raises(ValueError) as error:
        RecDataset(entries(tree), small(hyper_parameters__n_way=7, **WITHIN))
    message = str(error.value)
    assert message.startswith("hyper_parameters.task_sampling: within_alphabet: 2 alphabet(s) of ")
    assert "n_way = 7 characters: Alpha (3), Beta (6); " in message
    assert "set hyper_parameters.skip_small_alphabets: true to leave them out" in message
    assert "Gamma" not in message and "\n" not in message


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_skip_small_alphabets_leaves_them_out_with_a_warning(tree):
    cfg = small(hyper_parameters__n_way=5, hyper_parameters__skip_small_alphabets=True, **WITHIN)
    omniglot_reader._warned.clear()  # once per process: another test may have built this dataset first
    # the tools' logger (it does not propagate once tools/utils/console.py has set it up, so not caplog)
    logger, records = logging.getLogger("paddle_maml_tools"), Records()
    logger.addHandler(records)
    try:
        ds = RecDataset(entries(tree), cfg)
        RecDataset(entries(tree), cfg)  # the trainer builds it again every epoch: still one line
    finally:
        logger.removeHandler(records)
    assert (ds.sampled_alphabets, ds.skipped_alphabets) == (["Beta", "Gamma"], ["Alpha"])
    assert records.messages == [
        f"{tree}: hyper_parameters.skip_small_alphabets: 1 alphabet(s) with fewer than n_way = 5 characters "
        "left out of train tasks (3 characters unused): Alpha (3)"]
    assert all(alphabets_of(ds, ds.episode(0, i)) <= {"Beta", "Gamma"} for i in range(200))
    # even skipping, no alphabet big enough is an error
    with pytest.raises(ValueError, match=r"^hyper_parameters\.task_sampling: within_alphabet: no alphabet of .* "
                                         r"has n_way = 10 characters: Alpha \(3\), Beta \(6\), Gamma \(9\)$"):
        RecDataset(entries(tree), dict(cfg, **{"hyper_parameters.n_way": 10}))


def test_the_test_keys_decide_for_evaluation(tree):
    cfg = small(hyper_parameters__task_sampling_test="within_alphabet")  # training "any", evaluation within
    assert RecDataset(entries(tree), cfg, "train").task_sampling == "any"
    assert RecDataset(entries(tree), cfg, "infer").task_sampling == "within_alphabet"
    # skipping in training, none in evaluation: the error names the evaluation keys
    cfg = small(hyper_parameters__n_way=5, hyper_parameters__skip_small_alphabets=True,
                hyper_parameters__skip_small_alphabets_test=False, **WITHIN)
    assert RecDataset(entries(tree), cfg, "train").skipped_alphabets == ["Alpha"]
    with pytest.raises(ValueError, match=r"^hyper_parameters\.task_sampling: .* Alpha \(3\); .* set "
                                         r"hyper_parameters\.skip_small_alphabets_test: true"):
        RecDataset(entries(tree), cfg, "valid")


@pytest.mark.parametrize("key, value, message", [
    ("hyper_parameters.task_sampling", "within", "must be one of 'any', 'within_alphabet', got 'within'"),
    ("hyper_parameters.task_sampling_test", True, "must be one of 'any', 'within_alphabet', got True"),
    ("hyper_parameters.skip_small_alphabets", "yes", "must be true or false, got 'yes'"),
])
def test_bad_values_name_the_key(tree, key, value, message):
    mode = "infer" if key.endswith("_test") else "train"
    with pytest.raises(ValueError) as error:
        RecDataset(entries(tree), dict(small(), **{key: value}), mode)
    assert str(error.value) == f"{key}: {message}"


def test_the_trainer_stops_with_one_line_naming_config_key_and_alphabets(tree, tmp_path):
    process = run_tool("trainer.py", "-m", os.path.join(MAML_DIR, "config.yaml"), "-o",
                       f"runner.train_data_dir={tree}", f"runner.model_save_path={tmp_path / 'out'}",
                       "hyper_parameters.task_sampling=within_alphabet", "hyper_parameters.n_way=7",
                       "hyper_parameters.k_query=2")
    assert_user_error(process, "config.yaml: hyper_parameters.task_sampling: within_alphabet", "Alpha (3), Beta (6)")
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


# ----- Lake's split and the shipped config, on real Omniglot -----
def alphabet_sizes(archive):
    characters = collections.defaultdict(set)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                characters[parts[1]].add(parts[2])
    return {alphabet: len(chars) for alphabet, chars in characters.items()}


def test_lake_evaluation_alphabets_allow_20_way_tasks(omniglot_mirror):
    evaluation = alphabet_sizes(os.path.join(omniglot_mirror, "images_evaluation.zip"))
    assert len(evaluation) == 20 and min(evaluation.values()) == evaluation["Angelic"] == 20
    background = alphabet_sizes(os.path.join(omniglot_mirror, "images_background.zip"))
    # what config_omniglot_lake_20way_1shot.yaml's skip_small_alphabets leaves out of training (its header says so)
    assert {name: n for name, n in background.items() if n < 20} == {
        "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
        "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16, "Tagalog": 17}


def test_lake_20way_config_samples_within_alphabets_in_training_and_evaluation():
    plugin = load()[0]
    cfg = load_config(LAKE_20WAY, plugin_defaults=plugin.CONFIG_DEFAULTS)
    assert (cfg.get("hyper_parameters.n_way"), cfg.get("hyper_parameters.k_spt")) == (20, 1)
    for mode in ("train", "infer"):
        assert cfg.get(_mode_key(cfg, mode, "hyper_parameters.task_sampling")) == "within_alphabet"
    # training leaves out the background alphabets under 20 characters; evaluation must use every alphabet
    assert cfg.get(_mode_key(cfg, "train", "hyper_parameters.skip_small_alphabets")) is True
    assert cfg.get(_mode_key(cfg, "infer", "hyper_parameters.skip_small_alphabets")) is False


def extract_alphabets(archive, alphabets, out):
    """The Lake layout <split>/<Alphabet>/<character>/<image>.png of a few alphabets of one archive."""
    with zipfile.ZipFile(archive) as zf:
        members = [n for n in zf.namelist() if n.split("/")[1:2] and n.split("/")[1] in alphabets]
        for name in members:
            if name.endswith(".png"):
                target = out.joinpath(*name.split("/")[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    return out


def test_lake_20way_config_trains_and_evaluates_on_real_omniglot(omniglot_mirror, tmp_path):
    # A few alphabets of each archive (the whole split takes a minute to decode): Tagalog (17 characters) is
    # too small for 20-way tasks and left out of training with a warning; Angelic has exactly 20.
    train = extract_alphabets(os.path.join(omniglot_mirror, "images_background.zip"),
                              {"Tagalog", "Greek", "Latin"}, tmp_path / "omniglot_lake_train")
    test = extract_alphabets(os.path.join(omniglot_mirror, "images_evaluation.zip"),
                             {"Angelic", "Tengwar"}, tmp_path / "omniglot_lake_test")
    valid = extract_alphabets(os.path.join(omniglot_mirror, "images_background.zip"),
                              {"Arcadian"}, tmp_path / "omniglot_lake_valid")
    out = tmp_path / "out"
    tiny = [f"runner.train_data_dir={train}", f"runner.test_data_dir={test}", f"runner.model_save_path={out}",
            f"runner.valid_data_dir={valid}", "runner.valid_tasks=2",
            f"runner.infer_load_path={out}", "runner.epochs=1", "runner.tasks_per_epoch=4",
            "runner.train_batch_size=2", "runner.infer_start_epoch=0", "runner.infer_end_epoch=1",
            "runner.infer_tasks=2", "runner.infer_batch_size=1", "hyper_parameters.bn_channel=8",
            "hyper_parameters.update_step_test=1", "runner.print_interval=1"]
    trained = run_tool("trainer.py", "-m", LAKE_20WAY, "-o", *tiny)
    assert_ok(trained)
    assert ("hyper_parameters.skip_small_alphabets: 1 alphabet(s) with fewer than n_way = 20 characters left out "
            "of train tasks (17 characters unused): Tagalog (17)") in trained.stderr
    assert "batches: 2, samples: 4" in trained.stdout
    assert "valid epoch 0: acc " in trained.stdout  # 20-way tasks within Arcadian's 26 characters
    inferred = run_tool("infer.py", "-m", LAKE_20WAY, "-o", *tiny)
    assert_ok(inferred)
    assert "epoch 0: acc " in inferred.stdout and "(95% CI, 2 tasks)" in inferred.stdout
    assert "left out" not in inferred.stderr  # every evaluation alphabet is used
