"""Few-shot prediction with a trained model: adapt on a support folder, classify query images.

    python tools/predict.py -m <config.yaml> --support DIR --query PATH [PATH ...] [--json FILE] [-o key=value ...]

DIR holds one subfolder per class, named by the class, with one or more images each. A query PATH is an
image file or a folder (its images, subfolders included, in sorted order). Images are files with a common
image extension (IMAGE_EXTENSIONS); hidden entries are skipped.

The checkpoint is the one infer.py evaluates last: <runner.infer_load_path>/<epoch> for the last epoch of
[runner.infer_start_epoch, runner.infer_end_epoch), or with -o runner.infer_best=True the best epoch by
validation (best.json).

The plugin does the work in DygraphModel.predict(model, config, support, queries): support is
[(class name, [image paths])] in class-name order, queries [image paths]; it returns {"classes": [names],
"probabilities": [n_queries][n_classes], "settings": {...}, "seconds": {...}}. The tool prints one line per
query image (its predicted class and probability) and a summary; --json FILE writes the same with every
class's probability, atomically. When query images sit in folders named after support classes, the summary
also gives the accuracy on them.
"""
import os
import sys
import time


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time (see trainer.py).
from tools.infer import checkpoint_folders  # noqa: E402
from tools.utils.checkpoint import load_checkpoint, write_json_atomically  # noqa: E402
from tools.utils.cli import config_arg_parser, load_run_config, run_tool  # noqa: E402
from tools.utils.console import UserError, format_values, log, warn  # noqa: E402
from tools.utils.environment import select_device  # noqa: E402
from tools.utils.plugin import load_model_plugin  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _visible(name):
    return not name.startswith(".")


def _is_image(path):
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder):
    """Sorted image files in `folder` and its subfolders (hidden entries skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += [os.path.join(root, name) for name in sorted(files) if _visible(name)]
    return [path for path in found if _is_image(path)]


def support_classes(folder):
    """[(class name, [image paths])] of a support folder, in class-name order; one-line errors naming the path."""
    if not os.path.exists(folder):
        raise UserError(f"--support {folder}: folder not found")
    if not os.path.isdir(folder):
        raise UserError(f"--support {folder}: not a folder (expected one subfolder per class)")
    entries = sorted(name for name in os.listdir(folder) if _visible(name))
    class_dirs = [name for name in entries if os.path.isdir(os.path.join(folder, name))]
    if not class_dirs:
        raise UserError(f"--support {folder}: no class folders (expected {os.path.join(folder, '<class>', '<image>')})")
    loose = [name for name in entries if _is_image(os.path.join(folder, name))]
    if loose:
        warn(f"--support {folder}: {len(loose)} image file(s) outside the class folders are ignored")
    classes = []
    for name in class_dirs:
        class_dir = os.path.join(folder, name)
        images = [os.path.join(class_dir, file) for file in sorted(os.listdir(class_dir))
                  if _visible(file) and _is_image(os.path.join(class_dir, file))]
        if not images:
            raise UserError(f"{class_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        classes.append((name, images))
    return classes


def query_images(paths):
    """The query image files: each PATH as it is, or a folder's images; one-line errors naming the path."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            found = _images_under(path)
            if not found:
                raise UserError(f"--query {path}: no images in the folder ({', '.join(IMAGE_EXTENSIONS)})")
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise UserError(f"--query {path}: not found")
    return images


def chosen_checkpoint(config):
    """(folder, epoch, how it was chosen): the last epoch infer.py would evaluate."""
    load_dir, folders, selection_note = checkpoint_folders(config)
    epoch = max(folders)
    if selection_note:
        return folders[epoch], epoch, selection_note
    start, end = min(folders), max(folders) + 1
    return folders[epoch], epoch, (f"epoch {epoch}, the last of runner.infer_start_epoch/runner.infer_end_epoch "
                                   f"[{start}, {end})")


def _labelled_accuracy(queries, classes, predicted):
    """(correct, labelled) over the query images whose folder is named after a support class."""
    labelled = [(os.path.basename(os.path.dirname(os.path.abspath(path))), guess)
                for path, guess in zip(queries, predicted)]
    labelled = [(truth, guess) for truth, guess in labelled if truth in classes]
    return sum(truth == guess for truth, guess in labelled), len(labelled)


def _report(config, folder, epoch, support, queries, result):
    classes, probabilities = list(result["classes"]), result["probabilities"]
    rows = []
    for path, row in zip(queries, probabilities):
        row = [float(p) for p in row]
        best = max(range(len(row)), key=row.__getitem__)
        rows.append({"path": path, "class": classes[best], "probability": row[best],
                     "probabilities": dict(zip(classes, row))})
    report = {"config": config.path, "checkpoint": folder, "epoch": epoch, "classes": classes,
              "settings": result.get("settings", {}), "support": {name: paths for name, paths in support},
              "queries": rows}
    correct, labelled = _labelled_accuracy(queries, classes, [row["class"] for row in rows])
    if labelled:
        report["accuracy"] = {"correct": correct, "labelled": labelled, "value": correct / labelled}
    return report


def predict(args):
    support = support_classes(args.support)  # folder mistakes fail before paddle is imported
    queries = query_images(args.query)
    config, _ = load_run_config(args.config, args.overrides)
    model_obj = load_model_plugin(config)
    if not callable(getattr(model_obj, "predict", None)):
        raise UserError(f"{config.config_dir}: the model plugin's DygraphModel has no predict() method "
                        "(few-shot prediction is up to the model)")
    folder, epoch, how = chosen_checkpoint(config)
    select_device(config)
    model = model_obj.create_model(config)
    load_checkpoint(folder, model)
    log(f"checkpoint: {folder} ({how})")
    log(f"support: {len(support)} classes, {sum(len(paths) for _, paths in support)} images from {args.support}")
    start = time.perf_counter()
    result = model_obj.predict(model, config, support, queries)
    seconds = time.perf_counter() - start
    report = _report(config, folder, epoch, support, queries, result)
    if args.json:
        write_json_atomically(args.json, report)
    for row in report["queries"]:
        log(f"{row['path']}: {row['class']} ({row['probability']:.4f})")
    log(f"settings: {format_values(report['settings'])}")
    timings = ", ".join(f"{name} {value:.3f} s" for name, value in result.get("seconds", {}).items())
    log(f"predict done: {len(queries)} query images, {len(support)} classes; {timings or f'{seconds:.3f} s'}"
        + (f"; written to {args.json}" if args.json else ""))
    if "accuracy" in report:
        accuracy = report["accuracy"]
        log(f"accuracy: {accuracy['correct']}/{accuracy['labelled']} = {accuracy['value']:.4f} "
            "(query images in a folder named after a support class)")


def main(argv=None) -> int:
    parser = config_arg_parser("Adapt a trained few-shot model on a support folder and classify query images.")
    parser.add_argument("--support", required=True, metavar="DIR",
                        help="folder with one subfolder per class, named by the class, holding its images")
    parser.add_argument("--query", required=True, nargs="+", metavar="PATH",
                        help="query image files or folders of images (subfolders included)")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions, probabilities and settings here")
    args = parser.parse_args(argv)
    return run_tool(predict, args)


if __name__ == "__main__":
    sys.exit(main())
