"""Using a meta-trained MAML on your own few-shot task: adapt on a labelled support set, classify query images.

On arrays, for code that embeds the model:

    probabilities = adapt_and_classify(model, config, support_images, support_labels, query_images)

On image files (what tools/predict.py calls, through DygraphModel.predict):

    result = predict_files(model, config, [("alpha", ["alpha/1.png"]), ("beta", [...])], ["q1.png", "q2.png"])

The adaptation is evaluation's own: maml.query_logits, whose logits infer_forward scores. That is
update_step_test SGD steps (at base_optimizer.learning_rate, or the learned inner rates) on the mean
cross-entropy of the support set, then the query images through the adapted network. Batch norm uses batch
statistics, those of the support set while adapting; when classifying, it follows the model's norm mode
(model.norm, set by hyper_parameters.norm_mode of the config the model was made from): "transductive", those
of all query images together, as in MAML's evaluation (a query image's probabilities then depend on the other
query images it is classified with), or "support", those of the support set again (a query image's
probabilities then depend only on it and the support set: classified alone or with others, the same), or
"tasknorm_i", those of the support set blended with each image's own, while adapting too (also independent of
the other query images). Images are decoded and scaled as the reader does (omniglot_reader.decode_image,
to_network_input). predict_files adds distorted copies of the support images as evaluation does
(hyper_parameters.support_copies_test, or support_copies), drawn from generators seeded with runner.seed: the
same inputs give the same probabilities.

The network has n_way outputs. A task with fewer classes uses the first `classes` of them and masks the
others out of the support loss and the query prediction (maml.MetaBatch's `classes`); more classes than
n_way is an error naming hyper_parameters.n_way.
"""
import time

import numpy as np
import paddle

import maml
import maml_settings as settings
import omniglot_reader

# How batch norm normalised the images, per norm mode (net.NORM_MODES).
BATCH_NORM_NOTES = {
    "transductive": "batch statistics: of the support set while adapting, of all query images together when "
                    "classifying (transductive, as in MAML's evaluation)",
    "support": "batch statistics of the support set, while adapting and when classifying (each query image "
               "independently of the others)",
    "tasknorm_i": "TaskNorm-I: the support set's batch statistics blended with each image's own, while adapting and "
                  "when classifying (each query image independently of the others)",
}


def _images(name, images, size):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1:] != (1, size, size):
        raise ValueError(f"{name}: expected float images [n >= 1, 1, {size}, {size}], got shape {list(images.shape)}")
    return images


def _classes(config, model, labels, count):
    """The number of classes in the support labels, which must be 0 .. classes-1 each at least once."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"support_labels: expected {count} integer class ids, got {labels.dtype} {list(labels.shape)}")
    classes = int(labels.max()) + 1
    if labels.min() < 0 or len(np.unique(labels)) != classes:
        raise ValueError(f"support_labels: expected the class ids 0 .. {classes - 1}, each at least once, "
                         f"got {sorted(set(labels.tolist()))}")
    check_class_count(config, model, classes)
    return classes


def check_class_count(config, model, classes):
    if classes > model.n_way:
        raise settings.error(config, "hyper_parameters.n_way",
                           f"the support set has {classes} classes but the network has n_way = {model.n_way} outputs; "
                           f"use at most {model.n_way} classes, or a model trained with a larger n_way")


def adapt_and_classify(model, config, support_images, support_labels, query_images):
    """Class probabilities [n_query, classes] (numpy float) of the query images, after adapting the
    meta-learned `model` on the support set with the config's test-time settings.

    model: the plugin's network (DygraphModel().create_model(config), a checkpoint loaded into it); it is not
        changed.
    config: the run's config (the tools' Config, or a plain dict of dotted keys): update_step_test,
        base_optimizer.learning_rate and .class.
    support_images, query_images: float32 [n, 1, imgsize, imgsize] in the network's input scale, i.e.
        omniglot_reader.to_network_input of decoded images (ink -1, paper 1).
    support_labels: int [n_support]: class ids 0 .. classes-1, each at least once; classes may have different
        numbers of images (the support loss is the mean over the images). classes <= n_way.
    Column c of the result is class id c; each row sums to 1. Batch norm follows model.norm (see the module
    docstring; BATCH_NORM_NOTES[model.norm] says it in words).
    """
    size = _imgsize(config)
    support_images = _images("support_images", support_images, size)
    query_images = _images("query_images", query_images, size)
    classes = _classes(config, model, support_labels, support_images.shape[0])
    steps, lr, _ = settings.inner_settings(config, training=False)
    task = maml.MetaBatch(support_images[None], np.asarray(support_labels, dtype=np.int64)[None],
                          query_images[None], None, dtype=model.parameters()[0].dtype, classes=classes)
    logits = maml.query_logits(model, task, steps, lr)[0, :, :classes]
    return paddle.nn.functional.softmax(logits, axis=-1).numpy()


def _imgsize(config):
    return settings.positive_int(config, "hyper_parameters.imgsize")


def load_images(paths, config):
    """Image files as the network's input [n, 1, imgsize, imgsize], converted as the reader converts
    Omniglot (grayscale, resized, ink -1 and paper 1); an unreadable file is a one-line error naming it."""
    return omniglot_reader.to_network_input(_drawings(paths, config))


def _drawings(paths, config):
    size = _imgsize(config)
    return np.stack([omniglot_reader.decode_image(p, size, config) for p in paths])


def _support_with_copies(paths, labels, copies, config):
    """The support images as the network's input and their labels, with `copies` distorted copies of each."""
    drawings = _drawings(paths, config)
    if copies:
        seed = settings.nonnegative_int(config, "runner.seed")
        extra, extra_labels = omniglot_reader.with_copies(
            drawings, labels, copies, omniglot_reader.distortion_ranges(config),
            np.random.default_rng([seed, omniglot_reader.COPY_SHIFT_STREAM]),
            np.random.default_rng([seed, omniglot_reader.COPY_AFFINE_STREAM]))
        drawings, labels = np.concatenate([drawings, extra]), np.concatenate([labels, extra_labels])
    return omniglot_reader.to_network_input(drawings), labels


def predict_files(model, config, support, queries):
    """Few-shot prediction on image files.

    support: [(class name, [image paths])], one entry per class (its position is its class id);
    queries: [image paths]. Returns {"classes": [names], "probabilities": [n_query, classes] numpy,
    "settings": what the adaptation used, "seconds": {"decode": ..., "adapt+classify": ...}}.
    """
    check_class_count(config, model, len(support))  # before decoding anything
    start = time.perf_counter()
    labels = np.asarray([index for index, (_, paths) in enumerate(support) for _ in paths], dtype=np.int64)
    copies = omniglot_reader.support_copies(config, "infer")  # evaluation's
    support_images, labels = _support_with_copies([path for _, paths in support for path in paths], labels, copies,
                                                  config)
    query_images = load_images(queries, config)
    decoded = time.perf_counter()
    probabilities = adapt_and_classify(model, config, support_images, labels, query_images)
    done = time.perf_counter()
    steps, lr, _ = settings.inner_settings(config, training=False)
    used = {
        "update_step_test": steps,
        "inner_learning_rate": "learned per step" if model.inner_lr is not None else lr,
        "n_way": model.n_way,
        "outputs_used": len(support),
        "imgsize": _imgsize(config),
        "support_copies": copies,
        "norm_mode": model.norm,
        "batch_norm": BATCH_NORM_NOTES[model.norm],
    }
    return {"classes": [name for name, _ in support], "probabilities": probabilities, "settings": used,
            "seconds": {"decode": decoded - start, "adapt+classify": done - decoded}}
