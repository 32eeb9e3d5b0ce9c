"""Few-shot prediction on your own images: models/multitask/maml/few_shot.py and tools/predict.py.

A tiny checkpoint (8 channels, 1 epoch of 8 tasks) is trained once on the shipped synthetic sample; the
support and query folders are built from the sample's test classes."""
import json
import os
import shutil

import numpy as np
import pytest

from tool_helpers import REPO_ROOT, assert_ok, assert_user_error, run_tool

MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
CONFIG = os.path.join(MAML_DIR, "config.yaml")
SAMPLE_TEST = os.path.join(MAML_DIR, "data", "test", "alphabet_05")
SMALL = ["runner.train_batch_size=4", "runner.tasks_per_epoch=8", "runner.infer_batch_size=5",
         "runner.infer_tasks=10", "hyper_parameters.k_query=3", "hyper_parameters.update_step=1",
         "hyper_parameters.update_step_test=3", "hyper_parameters.bn_channel=8", "runner.print_interval=1",
         "runner.epochs=1", "runner.infer_start_epoch=0", "runner.infer_end_epoch=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("few_shot") / "out"
    assert_ok(run_tool("trainer.py", "-m", CONFIG, "-o", f"runner.model_save_path={out}", *SMALL))
    return out


def _overrides(checkpoint):
    return [f"runner.infer_load_path={checkpoint}", *SMALL]


def _task_folders(root, classes, support_shots, query_shots):
    """support/<class>/ with the first drawings of each sample class, query/<class>/ with the next ones."""
    for name, shots in zip(classes, support_shots):
        drawings = sorted(os.listdir(os.path.join(SAMPLE_TEST, name)))
        for kind, picked in (("support", drawings[:shots]), ("query", drawings[shots:shots + query_shots])):
            os.makedirs(root / kind / name, exist_ok=True)
            for file in picked:
                shutil.copy(os.path.join(SAMPLE_TEST, name, file), root / kind / name / file)
    return root / "support", root / "query"


CLASSES = [f"character0{i}" for i in range(1, 6)]


def _predict(checkpoint, support, *query, extra=()):
    return run_tool("predict.py", "-m", CONFIG, "--support", support, "--query", *query,
                    "-o", *_overrides(checkpoint), *extra)


# ----- the Python function: the same adaptation as infer_forward -----
@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(config, plugin object, model with the checkpoint, few_shot module), in this process."""
    from tools.utils.checkpoint import load_checkpoint
    from tools.utils.config import load_config
    from tools.utils.plugin import import_file, import_plugin_module, load_model_plugin, plugin_declaration

    # As the tools load it, less preparing the process's environment (paddle is already imported here).
    defaults = plugin_declaration(import_plugin_module(load_config(CONFIG)), "CONFIG_DEFAULTS")
    config = load_config(CONFIG, _overrides(checkpoint), defaults)
    plugin = load_model_plugin(config)
    model = plugin.create_model(config)
    load_checkpoint(str(checkpoint / "0"), model)
    return config, plugin, model, import_file(os.path.join(MAML_DIR, "few_shot.py"))


def test_reader_tasks_get_exactly_infer_forwards_accuracies(loaded):
    from tools.utils.plugin import create_dataset

    config, plugin, model, few_shot = loaded
    dataset = create_dataset(config, "infer")
    tasks = [dataset.task(0, index) for index in range(10)]
    batch = [np.stack([task[part] for task in tasks]) for part in range(4)]
    metrics, _ = plugin.infer_forward(model, plugin.create_metrics()[0], batch, config)
    expected = metrics[0].state()
    got = []
    for x_spt, y_spt, x_qry, y_qry in tasks:
        probabilities = few_shot.adapt_and_classify(model, config, x_spt, y_spt, x_qry)
        assert probabilities.shape == (len(y_qry), 5)
        got.append(float((probabilities.argmax(axis=1) == y_qry).astype(np.float32).mean()))
    assert len(set(expected)) > 1, expected  # tasks that differ, so a wrong adaptation shows
    assert got == expected


def _sliced_model(plugin, config, model, classes):
    """A network with only `classes` outputs: the checkpoint's parameters, the head cut to its first columns."""
    small_config = dict(config)
    small_config["hyper_parameters.n_way"] = classes
    small = plugin.create_model(small_config)
    state = {name: value.numpy() for name, value in model.state_dict().items()}
    state["fc_weight"], state["fc_bias"] = state["fc_weight"][:, :classes], state["fc_bias"][:classes]
    small.set_state_dict(state)
    return small_config, small


def test_fewer_classes_than_n_way_use_only_that_many_outputs(loaded):
    """3 classes on the 5-way network: exactly what a 3-way network with the same first 3 outputs gives,
    in the support loss of every step and in the query prediction."""
    config, plugin, model, few_shot = loaded
    x_spt, y_spt, x_qry, y_qry = create_task(config, classes=3)
    masked = few_shot.adapt_and_classify(model, config, x_spt, y_spt, x_qry)
    small_config, small = _sliced_model(plugin, config, model, 3)
    reference = few_shot.adapt_and_classify(small, small_config, x_spt, y_spt, x_qry)
    assert masked.shape == (len(x_qry), 3)
    np.testing.assert_allclose(masked, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked.sum(axis=1), 1.0, rtol=1e-6)


def create_task(config, classes, shots=None, queries=4):
    """Support and query arrays from the sample's test classes, through the reader's own conversion."""
    import omniglot_reader  # the model folder is on sys.path once the plugin is loaded

    size, shots = config["hyper_parameters.imgsize"], shots or [1] * classes
    support, labels, query = [], [], []
    for label, name in enumerate(CLASSES[:classes]):
        drawings = sorted(os.listdir(os.path.join(SAMPLE_TEST, name)))
        paths = [os.path.join(SAMPLE_TEST, name, file) for file in drawings]
        support += paths[:shots[label]]
        labels += [label] * shots[label]
        query += paths[shots[label]:shots[label] + queries]

    def pixels(paths):
        return omniglot_reader.to_network_input(np.stack([omniglot_reader.decode_image(p, size, config)
                                                          for p in paths]))

    return pixels(support), np.asarray(labels), pixels(query), np.repeat(np.arange(classes), queries)


def test_unequal_shots_weigh_images_by_a_mean_loss(loaded):
    """Classes with 3, 1 and 2 images: doubling every support image changes neither the mean support loss
    nor the batch statistics, so the probabilities must not change (a summed loss would double the steps)."""
    config, _, model, few_shot = loaded
    x_spt, y_spt, x_qry, _ = create_task(config, classes=3, shots=(3, 1, 2))
    once = few_shot.adapt_and_classify(model, config, x_spt, y_spt, x_qry)
    twice = few_shot.adapt_and_classify(model, config, np.concatenate([x_spt, x_spt]), np.concatenate([y_spt, y_spt]),
                                        x_qry)
    np.testing.assert_allclose(once, twice, rtol=1e-4, atol=1e-5)
    # The adaptation does move: without it the probabilities are different.
    assert not np.allclose(once, few_shot.adapt_and_classify(model, dict(config, **{
        "hyper_parameters.update_step_test": 0}), x_spt, y_spt, x_qry), atol=1e-3)


def test_too_many_classes_for_the_network_is_an_error_naming_n_way(loaded):
    config, _, model, few_shot = loaded
    x_spt, y_spt, x_qry, _ = create_task(config, classes=5)
    with pytest.raises(ValueError, match="hyper_parameters.n_way"):
        few_shot.adapt_and_classify(model, config, np.concatenate([x_spt, x_spt[:1]]), np.append(y_spt, 5), x_qry)


def test_prediction_adapts_on_evaluations_support_copies(loaded, tmp_path):
    """predict_files with support_copies_test adapts on the support drawings plus that many shifted copies of
    each (labelled as it, drawn from runner.seed's generators), as evaluation's reader gives them."""
    import omniglot_reader

    config, _, model, few_shot = loaded
    support_dir, query_dir = _task_folders(tmp_path, CLASSES, [1] * 5, 2)
    support = [(name, sorted(str(p) for p in (support_dir / name).iterdir())) for name in CLASSES]
    queries = sorted(str(p) for p in query_dir.rglob("*.png"))
    copied = dict(config, **{"hyper_parameters.train_shift": 1, "hyper_parameters.support_copies_test": 2})
    result = few_shot.predict_files(model, copied, support, queries)
    assert result["settings"]["support_copies"] == 2
    drawings = np.stack([omniglot_reader.decode_image(paths[0], 28, config) for _, paths in support])
    seed = config["runner.seed"]
    copies, labels = omniglot_reader.with_copies(
        drawings, np.arange(5), 2, omniglot_reader.Distortion(0.0, 0.0, 0.0, 1),
        np.random.default_rng([seed, omniglot_reader.COPY_SHIFT_STREAM]),
        np.random.default_rng([seed, omniglot_reader.COPY_AFFINE_STREAM]))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(5), 2))
    x_spt = omniglot_reader.to_network_input(np.concatenate([drawings, copies]))
    expected = few_shot.adapt_and_classify(model, copied, x_spt, np.concatenate([np.arange(5), labels]),
                                           few_shot.load_images(queries, config))
    np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-5, atol=1e-6)
    without = few_shot.predict_files(model, config, support, queries)
    assert without["settings"]["support_copies"] == 0
    assert not np.allclose(result["probabilities"], without["probabilities"], atol=1e-4)


# ----- the command -----
def test_command_end_to_end_with_json(checkpoint, tmp_path):
    support, query = _task_folders(tmp_path, CLASSES, [1] * 5, 4)
    process = _predict(checkpoint, support, query, extra=["--json", tmp_path / "out.json"])
    assert_ok(process)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["classes"] == CLASSES
    assert report["epoch"] == 0 and report["checkpoint"] == str(checkpoint / "0")
    assert report["settings"]["update_step_test"] == 3 and report["settings"]["outputs_used"] == 5
    assert len(report["queries"]) == 20
    for row in report["queries"]:
        assert set(row["probabilities"]) == set(CLASSES)
        assert abs(sum(row["probabilities"].values()) - 1.0) < 1e-5
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
        assert f"{row['path']}: {row['class']} ({row['probability']:.4f})" in process.stdout
    correct = sum(os.path.basename(os.path.dirname(row["path"])) == row["class"] for row in report["queries"])
    assert report["accuracy"] == {"correct": correct, "labelled": 20, "value": correct / 20}
    assert f"accuracy: {correct}/20" in process.stdout
    assert "adapt+classify" in process.stdout


def test_command_is_deterministic(checkpoint, tmp_path):
    support, query = _task_folders(tmp_path, CLASSES, [1] * 5, 3)
    outputs = []
    for run in range(2):
        assert_ok(_predict(checkpoint, support, query, extra=["--json", tmp_path / f"{run}.json"]))
        outputs.append((tmp_path / f"{run}.json").read_bytes())
    assert outputs[0] == outputs[1]


def test_queries_saved_by_a_drawing_app_get_the_answers_of_the_originals(checkpoint, tmp_path):
    """Black ink on a transparent background (RGBA) and 16-bit grey queries are read as the 1-bit originals."""
    from PIL import Image

    support, query = _task_folders(tmp_path, CLASSES, [1] * 5, 3)
    answers = {}
    for kind in ("original", "RGBA", "I;16"):
        folder = tmp_path / kind
        for path in sorted(query.glob("*/*.png")):
            ink = 255 - np.asarray(Image.open(path).convert("L"), dtype=np.uint16)
            (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            if kind == "RGBA":
                pixels = np.stack([np.zeros_like(ink)] * 3 + [ink], -1).astype(np.uint8)
                Image.fromarray(pixels, "RGBA").save(folder / path.parent.name / path.name)
            elif kind == "I;16":  # the same levels in 16 bits, as a scanner's output
                Image.fromarray(((255 - ink) * 257).astype(np.uint16)).save(folder / path.parent.name / path.name)
            else:
                shutil.copy(path, folder / path.parent.name / path.name)
        assert_ok(_predict(checkpoint, support, folder, extra=["--json", tmp_path / f"{kind}.json"]))
        rows = json.loads((tmp_path / f"{kind}.json").read_text())["queries"]
        answers[kind] = [row["class"] for row in rows]
    assert len(set(answers["original"])) > 1  # not one answer for all
    assert answers["RGBA"] == answers["original"]
    assert answers["I;16"] == answers["original"]


def test_command_with_fewer_classes_and_unequal_shots(checkpoint, tmp_path):
    support, query = _task_folders(tmp_path, CLASSES[:3], [3, 1, 2], 2)
    first = sorted(os.listdir(query / CLASSES[0]))[0]
    process = _predict(checkpoint, support, query / CLASSES[0] / first, query / CLASSES[1],
                       extra=["--json", tmp_path / "out.json"])
    assert_ok(process)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["settings"]["outputs_used"] == 3 and report["settings"]["n_way"] == 5
    assert [len(paths) for paths in report["support"].values()] == [3, 1, 2]
    assert len(report["queries"]) == 3
    assert all(set(row["probabilities"]) == set(CLASSES[:3]) for row in report["queries"])


def _write(path, data=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize("case", ["missing support", "support is a file", "no class folders", "class without images",
                                  "unreadable image", "missing query", "query folder without images",
                                  "more classes than n_way", "checkpoint does not match"])
def test_bad_input_is_a_one_line_error(checkpoint, tmp_path, case):
    support, query = _task_folders(tmp_path, CLASSES, [1] * 5, 2)
    extra = []
    if case == "missing support":
        support, expected = tmp_path / "nowhere", ["--support", "nowhere", "not found"]
    elif case == "support is a file":
        support, expected = tmp_path / "file.png", ["--support", "file.png", "not a folder"]
        _write(support)
    elif case == "no class folders":
        support, expected = tmp_path / "flat", ["--support", "flat", "no class folders"]
        _write(support / "a.png")
    elif case == "class without images":
        shutil.rmtree(support / CLASSES[2])
        _write(support / CLASSES[2] / "notes.txt", b"not an image")
        expected = [os.path.join("support", CLASSES[2]), "no images"]
    elif case == "unreadable image":
        _write(support / CLASSES[1] / "broken.png", b"this is not a png")
        expected = ["broken.png", "cannot decode image"]
    elif case == "missing query":
        query, expected = tmp_path / "gone.png", ["--query", "gone.png", "not found"]
    elif case == "query folder without images":
        query, expected = tmp_path / "empty", ["--query", "empty", "no images"]
        os.makedirs(query / "sub")
    elif case == "more classes than n_way":
        shutil.copytree(support / CLASSES[0], support / "character06")
        expected = ["hyper_parameters.n_way", "6 classes", "n_way = 5"]
    else:  # a network of another width than the checkpoint's
        extra, expected = ["-o", "hyper_parameters.bn_channel=16"], ["rec.pdparams", "conv0_weight"]
    process = _predict(checkpoint, support, query, extra=["--json", tmp_path / "out.json", *extra])
    assert_user_error(process, *expected)
    assert not os.path.exists(tmp_path / "out.json")


@pytest.mark.parametrize("where", ["--query file", "in a query folder", "in a support class", "a device as --query"])
def test_a_fifo_or_device_is_refused_naming_it_not_a_hang(tmp_path, where):
    """Refused before the checkpoint is looked at (none exists here); run_tool's timeout fails a hang."""
    support, query = _task_folders(tmp_path, CLASSES[:2], [1, 1], 1)
    fifo = {"--query file": tmp_path / "q.png", "in a query folder": query / CLASSES[0] / "q.png",
            "in a support class": support / CLASSES[1] / "s.png"}.get(where)
    if fifo is None:
        fifo = os.devnull
    else:
        os.mkfifo(fifo)
    queries = [fifo] if where in ("--query file", "a device as --query") else [query]
    process = run_tool("predict.py", "-m", CONFIG, "--support", support, "--query", *queries,
                       "-o", f"runner.infer_load_path={tmp_path / 'none'}")
    label = "--query " if len(queries) == 1 and queries[0] == fifo else ""
    assert_user_error(process, f"{label}{fifo}: not a regular file")


def test_a_plugin_without_a_predict_hook_is_a_one_line_error(tmp_path):
    from tool_helpers import TOY_CONFIG

    support, query = _task_folders(tmp_path, CLASSES[:2], [1, 1], 1)
    process = run_tool("predict.py", "-m", TOY_CONFIG, "--support", support, "--query", query)
    assert_user_error(process, "toy_model", "no predict() method")


def test_under_a_multi_process_launcher_it_is_a_one_line_error(tmp_path):
    """predict runs in one process: N launched ranks would each write the same --json file."""
    support, query = _task_folders(tmp_path, CLASSES[:2], [1, 1], 1)
    process = run_tool("predict.py", "-m", CONFIG, "--support", support, "--query", query, "--json",
                       tmp_path / "out.json", env={"PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "2"})
    assert_user_error(process, "tools/predict.py", "runs in one process", "started 2")
    assert not os.path.exists(tmp_path / "out.json")
