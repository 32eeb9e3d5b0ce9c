"""Few-shot prediction with a trained model: adapt on a support folder, classify query images (doc/tools.md).

    python tools/predict.py -m <config.yaml> --support DIR --query PATH [PATH ...] [--json FILE] [-o key=value ...]

The plugin's DygraphModel.predict() does the work with the checkpoint infer.py evaluates last; this tool lists the
support classes (DIR/<class>/<images>) and query images, and prints (--json: writes) the predictions.
"""
import os
import sys
import time

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: environment.load_run_config prepares the environment first.
from tools.utils.checkpoint import check_output_file, is_run_file, write_json_atomically  # noqa: E402
from tools.utils.console import UserError, config_arg_parser, format_values, log, run_tool, warn  # noqa: E402
from tools.utils.distributed import single_process  # noqa: E402
from tools.utils.environment import load_run_config, select_device  # noqa: E402
from tools.utils.evaluation import RANGE_KEYS, checkpoint_folders, load_models  # noqa: E402
from tools.utils.plugin import load_model_plugin  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NOT_REGULAR = "not a regular file (a FIFO, device or socket); only image files can be read"


def _images(folder, recursive):
    """Sorted image files in `folder` (and with `recursive` its subfolders), hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith(".")) if recursive else []
        found += [os.path.join(root, name) for name in sorted(files) if not name.startswith(".")]
    return [path for path in found if path.lower().endswith(IMAGE_EXTENSIONS) and _readable_file(path)]


def _readable_file(path, label=""):
    """Whether `path` is a file to read (folders and dangling links are not); a FIFO, device or socket is an error
    naming it: reading one would block for ever or read no image, and skipping it would go unseen."""
    if os.path.isdir(path) or not os.path.exists(path):
        return False
    if not os.path.isfile(path):
        raise UserError(f"{label}{path}: {NOT_REGULAR}")
    return True


def support_classes(folder):
    """[(class name, [image paths])] of a support folder, in class-name order."""
    if not os.path.isdir(folder):
        raise UserError(f"--support {folder}: " + ("not a folder (expected one subfolder per class)"
                                                   if os.path.exists(folder) else "folder not found"))
    names = sorted(name for name in os.listdir(folder)
                   if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))
    if not names:
        raise UserError(f"--support {folder}: no class folders (expected {os.path.join(folder, '<class>', '<image>')})")
    loose = _images(folder, recursive=False)
    if loose:
        warn(f"--support {folder}: {len(loose)} image file(s) outside the class folders are ignored")
    classes = [(name, _images(os.path.join(folder, name), recursive=False)) for name in names]
    for name, images in classes:
        if not images:
            raise UserError(f"{os.path.join(folder, name)}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes


def query_images(paths):
    """The query image files: each PATH as it is, or a folder's images."""
    images = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"--query {path}: not found")
        if not os.path.isdir(path):
            _readable_file(path, "--query ")
        found = _images(path, recursive=True) if os.path.isdir(path) else [path]
        if not found:
            raise UserError(f"--query {path}: no images in the folder ({', '.join(IMAGE_EXTENSIONS)})")
        images += found
    return images


def report(config, folder, epoch, support, queries, result):
    """The predictions as a JSON-ready dict, one row per query (best class, its probability, all of them)."""
    classes, rows = list(result["classes"]), []
    for path, row in zip(queries, result["probabilities"]):
        row = [float(p) for p in row]
        best = max(range(len(row)), key=row.__getitem__)
        rows.append({"path": path, "class": classes[best], "probability": row[best],
                     "probabilities": dict(zip(classes, row))})
    found = {"config": config.path, "checkpoint": folder, "epoch": epoch, "classes": classes,
             "settings": result.get("settings", {}), "support": dict(support), "queries": rows}
    # Query images in a folder named after a support class are labelled by it.
    labelled = [(os.path.basename(os.path.dirname(os.path.abspath(row["path"]))), row["class"]) for row in rows]
    labelled = [(truth, guess) for truth, guess in labelled if truth in classes]
    if labelled:
        correct = sum(truth == guess for truth, guess in labelled)
        found["accuracy"] = {"correct": correct, "labelled": len(labelled), "value": correct / len(labelled)}
    return found


def predict(args):
    if args.json:  # only a predictions file of an earlier run may be replaced
        check_output_file(args.json, "predictions", "--json", lambda path: is_run_file(path, "queries"))
    support = support_classes(args.support)  # folder mistakes fail before paddle is imported
    queries = query_images(args.query)
    config, _ = load_run_config(args.config, args.overrides)
    single_process("predict.py", config)
    plugin = load_model_plugin(config)
    plugin.require("predict", config.config_dir)
    _, folders, chosen = checkpoint_folders(config)  # the last epoch infer.py would evaluate
    epoch = max(folders)
    how = chosen or f"epoch {epoch}, the last of {RANGE_KEYS} [{min(folders)}, {epoch + 1})"
    select_device(config)
    (model,) = load_models(plugin, config, [folders[epoch]])
    log(f"checkpoint: {folders[epoch]} ({how})")
    log(f"support: {len(support)} classes, {sum(len(paths) for _, paths in support)} images from {args.support}")
    start = time.perf_counter()
    result = plugin.predict(model, config, support, queries)
    seconds = time.perf_counter() - start
    found = report(config, folders[epoch], epoch, support, queries, result)
    if args.json:
        write_json_atomically(args.json, found)
    for row in found["queries"]:
        log(f"{row['path']}: {row['class']} ({row['probability']:.4f})")
    log(f"settings: {format_values(found['settings'])}")
    timings = ", ".join(f"{name} {value:.3f} s" for name, value in result.get("seconds", {}).items())
    log(f"predict done: {len(queries)} query images, {len(support)} classes; {timings or f'{seconds:.3f} s'}"
        + (f"; written to {args.json}" if args.json else ""))
    if "accuracy" in found:
        accuracy = found["accuracy"]
        log(f"accuracy: {accuracy['correct']}/{accuracy['labelled']} = {accuracy['value']:.4f} "
            "(query images in a folder named after a support class)")


def main(argv=None) -> int:
    parser = config_arg_parser("Adapt a trained few-shot model on a support folder and classify query images.")
    parser.add_argument("--support", required=True, metavar="DIR",
                        help="folder with one subfolder per class, named by the class, holding its images")
    parser.add_argument("--query", required=True, nargs="+", metavar="PATH",
                        help="query image files or folders of images (subfolders included)")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions, probabilities and settings here")
    return run_tool(predict, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
