"""This model's settings: every key the plugin and the reader read, with its default, type, range and meaning,
and the settings derived from them (inner_settings, multi_step_weights).

Every reader of the config (dygraph_model.py, few_shot.py, omniglot_reader.py) goes through the functions here,
so a key has one default and one range, and a bad value gets the same one-line error naming its key wherever it
is read. `config` is the tools' Config, whose error() names the config file, or any mapping of dotted keys
(PaddleRec's tools, the tests, a user's own loop), which gets a ValueError "key: message".
"""
import inspect
import math
import numbers
from collections import namedtuple

# One row of the table: `default` None means required (or, for a `_test` key, "as the training key");
# `low`/`high` bound a number (None: no bound); `why` says where an upper bound comes from.
Key = namedtuple("Key", "default kind low high meaning why", defaults=(None, None, "", ""))

# Inner steps: each one keeps a copy of every activation on the graph (second order), so memory and time grow
# linearly; MAML trains with 1-5 and evaluates with up to 10, and 100 is ten times that.
_STEPS_WHY = "each inner step keeps a copy of every activation; MAML uses 1-10"
# Pixels: Omniglot is drawn at 105 px; the decoded cache and the first layer grow with the square of the size.
_IMGSIZE_WHY = "Omniglot is drawn at 105 px; memory grows with the square of the size"

TABLE = {
    "hyper_parameters.n_way": Key(None, "int", 1, 1000, "classes per task; the output size of the head",
                                  "a task holds n_way x (k_spt + k_query) images; the reader also caps it at "
                                  "the classes of the split"),
    # k_spt + k_query (or k_query_test) is at most the 20 drawings of an Omniglot character (the reader checks).
    "hyper_parameters.k_spt": Key(None, "int", 1, None, "support images per class"),
    "hyper_parameters.k_query": Key(None, "int", 1, None, "query images per class in training"),
    "hyper_parameters.k_query_test": Key(None, "int", 1, None, "query images per class when evaluating"),
    "hyper_parameters.n_way_test": Key(None, "int", 1, 1000, "classes per task when evaluating (at most n_way: the "
                                       "first n_way_test outputs of the head)", "at most n_way (checked)"),
    "hyper_parameters.first_order": Key(False, "bool", meaning="true: first-order MAML (FOMAML)"),
    "hyper_parameters.update_step": Key(5, "int", 0, 100, "inner SGD steps in training", _STEPS_WHY),
    "hyper_parameters.update_step_test": Key(10, "int", 0, 100, "inner SGD steps when evaluating", _STEPS_WHY),
    "hyper_parameters.imgsize": Key(28, "int", 1, 256, "images are resized to imgsize x imgsize pixels",
                                    _IMGSIZE_WHY),
    "hyper_parameters.conv_stride": Key(1, "int", 1, 8, "stride of every convolution",
                                        "a stride wider than the kernel skips pixels"),
    "hyper_parameters.conv_padding": Key(1, "int", 0, 8, "zero padding of every convolution",
                                         "more padding than kernel adds only zeros"),
    "hyper_parameters.conv_kernal": Key([3, 3], "kernel", meaning="square convolution kernel, e.g. [3, 3]"),
    "hyper_parameters.bn_channel": Key(64, "int", 1, 1024, "channels of every conv block",
                                       "memory grows with the channels; MAML uses 32-64"),
    "hyper_parameters.meta_optimizer.class": Key("Adam", "optimizer",
                                                 meaning="a paddle.optimizer class for the outer loop"),
    "hyper_parameters.meta_optimizer.learning_rate": Key(0.001, "rate", meaning="outer (meta) learning rate"),
    "hyper_parameters.base_optimizer.class": Key("SGD", "str", meaning="must be SGD: the inner loop is plain SGD"),
    "hyper_parameters.base_optimizer.learning_rate": Key(0.1, "rate", meaning="inner step size"),
    "hyper_parameters.rotations": Key(False, "bool", meaning="reader: 4 rotated classes per character"),
    "hyper_parameters.rotations_test": Key(None, "bool", meaning="reader: rotations when evaluating"),
    "hyper_parameters.task_sampling": Key("any", "choice", meaning='reader: "within_alphabet": one alphabet a task'),
    "hyper_parameters.task_sampling_test": Key(None, "choice", meaning="reader: task_sampling when evaluating"),
    "hyper_parameters.skip_small_alphabets": Key(False, "bool",
                                                 meaning="reader: leave out alphabets of fewer than n_way classes"),
    "hyper_parameters.skip_small_alphabets_test": Key(None, "bool", meaning="reader: the same when evaluating"),
    "hyper_parameters.train_shift": Key(0, "int", 0, 128, "reader: random shift of training images, in pixels",
                                        "less than half the image (checked against imgsize)"),
    # The other random distortions of training images (omniglot_reader.py), off at 0.
    "hyper_parameters.train_rotate": Key(0.0, "float", 0.0, 180.0, "reader: random turn of training images, "
                                         "in degrees", "a half turn either way covers every angle"),
    "hyper_parameters.train_shear": Key(0.0, "float", 0.0, 45.0, "reader: random shear of training images along "
                                        "each axis, in degrees", "45 degrees is a unit shear"),
    # "fraction": the upper bound itself is excluded.
    "hyper_parameters.train_scale": Key(0.0, "fraction", 0.0, 1.0, "reader: random scale of training images "
                                        "along each axis, by 1 +- this", "a factor of 1 - 1 would be 0"),
    # Support augmentation: each copy is one more image to adapt on, so time grows with it.
    "hyper_parameters.support_copies": Key(0, "int", 0, 50, "reader: distorted copies of each support drawing added "
                                           "to the support set (within the train_* ranges)",
                                           "each copy adds a support image to every inner step"),
    "hyper_parameters.support_copies_test": Key(None, "int", 0, 50, "reader and predict: support_copies when "
                                                "evaluating", "each copy adds a support image to every inner step"),
    # MAML++ (Antoniou et al., 2019), each off by default; all off is the MAML paper's algorithm.
    "hyper_parameters.multi_step_loss_epochs": Key(0, "int", 0, None,
                                                   "> 0: query loss after every inner step, annealed to the last"),
    "hyper_parameters.learn_inner_lr": Key(False, "bool",
                                           meaning="a learned inner rate per adapted tensor per inner step"),
    "hyper_parameters.per_step_bn": Key(False, "bool",
                                        meaning="batch-norm gamma/beta per inner stage, learned by the outer loop"),
    "hyper_parameters.meta_optimizer.cosine_annealing": Key(False, "bool",
                                                            meaning="meta rate follows a cosine to 1% by the end"),
    "hyper_parameters.first_order_epochs": Key(0, "int", 0, None, "the first N epochs first-order, second after"),
    # Tasks per pass: memory against speed, the same result (maml.py).
    "hyper_parameters.tasks_per_chunk": Key(4, "int", 1, None, "tasks per pass: memory against speed"),
    # Batch norm of the query images, in meta-training and evaluation (net.NORM_MODES): "support" (the support set's
    # statistics: a query image's class does not depend on the others, so a prediction is the same alone or in a
    # batch), "transductive" (MAML's, the query set's own statistics; the published protocols use it) or
    # "tasknorm_i" (the support set's blended with each image's own, a learned weight per block).
    "hyper_parameters.norm_mode": Key("support", "choice",
                                      meaning="batch norm of the query images: transductive, support or tasknorm_i"),
}

# What the reader falls back to when no tools supply runner defaults (PaddleRec's tools have none).
READER_RUNNER_DEFAULTS = {
    "runner.seed": 2026,
    "runner.tasks_per_epoch": 3200,  # what PaddleRec's reader hard-codes
    "runner.infer_tasks": 1000,
    "runner.train_batch_size": 32,
    "runner.infer_batch_size": 32,
}

# The plugin's CONFIG_DEFAULTS: keys with a default the tools merge under the YAML (so `-o` can set them too).
# The required keys (n_way, k_spt, k_query) come from the YAML; k_query_test is declared so `-o` can set it.
CONFIG_DEFAULTS = {key: row.default for key, row in TABLE.items()
                   if key not in ("hyper_parameters.n_way", "hyper_parameters.k_spt", "hyper_parameters.k_query")}

def error(config, key, message):
    """The exception to raise for a bad `key` (or a bad data path, named in its place)."""
    if hasattr(config, "error"):
        return config.error(key, message)
    return ValueError(f"{key}: {message}")


def is_int(value):
    """An integer and not a bool (YAML's `true` would otherwise pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def default(key):
    """The table's default of `key` (READER_RUNNER_DEFAULTS for runner keys), or None."""
    row = TABLE.get(key)
    return row.default if row is not None else READER_RUNNER_DEFAULTS.get(key)


def setting(config, key, default_value=None):
    """config[key], or the default (given, else the table's) when the key is unset or null (the tools declare
    some keys without a value); an error when both are missing."""
    value = config.get(key)
    if value is None:
        value = default(key) if default_value is None else default_value
    if value is None:
        raise error(config, key, "missing required key")
    return value


def _in_range(config, key, value):
    """`value` if it lies in the table's range for `key`; else an error naming the bound and where it comes from."""
    row = TABLE.get(key)
    if row is not None and row.high is not None and value > row.high:
        raise error(config, key, f"must be at most {row.high} ({row.why}), got {value!r}")
    return value


def positive_int(config, key, default_value=None):
    value = setting(config, key, default_value)
    if not is_int(value) or value < 1:
        raise error(config, key, f"must be a positive integer, got {value!r}")
    return _in_range(config, key, int(value))


def nonnegative_int(config, key, default_value=None):
    value = setting(config, key, default_value)
    if not is_int(value) or value < 0:
        raise error(config, key, f"must be a non-negative integer, got {value!r}")
    return _in_range(config, key, int(value))


def boolean(config, key, default_value=None):
    value = setting(config, key, default_value)
    if not isinstance(value, bool):
        raise error(config, key, f"must be true or false, got {value!r}")
    return value


def positive_float(config, key, default_value=None):
    """A finite number above 0 (a learning rate of inf or nan would only show up as a NaN loss later)."""
    value = setting(config, key, default_value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise error(config, key, f"must be a finite positive number, got {value!r}")
    return _in_range(config, key, float(value))


def number_in_range(config, key):
    """A number within the table's [low, high] for `key` ([low, high) for a "fraction"), as a float."""
    row = TABLE[key]
    value = setting(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(config, key, f"must be a number, got {value!r}")
    high_open = row.kind == "fraction"
    if not (row.low <= value and (value < row.high if high_open else value <= row.high)):
        raise error(config, key, f"must be at least {row.low:g} and {'below' if high_open else 'at most'} "
                                 f"{row.high:g}, got {value!r}")
    return float(value)


def choice(config, key, choices, default_value=None):
    """One of the strings in `choices` (a typo must not fall back to a default silently)."""
    value = setting(config, key, default_value)
    if not isinstance(value, str) or value not in choices:
        raise error(config, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def kernel_size(config):
    """hyper_parameters.conv_kernal's side: a square kernel like [3, 3]."""
    key = "hyper_parameters.conv_kernal"
    kernel = setting(config, key)
    if not (isinstance(kernel, list) and len(kernel) == 2 and kernel[0] == kernel[1]
            and is_int(kernel[0]) and 1 <= kernel[0] <= 15):
        raise error(config, key, f"expected a square kernel like [3, 3] (side 1 to 15), got {kernel!r}")
    return kernel[0]


def _steps_by_itself(cls):
    return "closure" not in inspect.signature(cls.step).parameters


def optimizer_class(config, optimizers, base):
    """The class hyper_parameters.meta_optimizer.class names in the module `optimizers` (paddle.optimizer): a
    concrete subclass of `base` whose step() needs no closure (not the abstract base itself, not LBFGS)."""
    key = "hyper_parameters.meta_optimizer.class"
    name = setting(config, key)
    found = getattr(optimizers, str(name), None)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise error(config, key, f"unknown paddle optimizer {name!r}")
    if found is base or not _steps_by_itself(found):
        usable = sorted(n for n, c in vars(optimizers).items()
                        if isinstance(c, type) and issubclass(c, base) and c is not base and _steps_by_itself(c))
        raise error(config, key, f"{name} cannot train the meta-parameters here; use one of {', '.join(usable)}")
    return found


# ----- settings derived from the keys -----
InnerSettings = namedtuple("InnerSettings", "steps lr first_order")


def inner_settings(config, training, epoch=0):
    """(steps, inner learning rate, first_order) for training in `epoch`, or for test-time adaptation: the one
    place update_step and update_step_test are read."""
    steps = nonnegative_int(config, "hyper_parameters.update_step" if training else
                            "hyper_parameters.update_step_test")
    lr = positive_float(config, "hyper_parameters.base_optimizer.learning_rate")
    if setting(config, "hyper_parameters.base_optimizer.class") != "SGD":
        # MAML's inner loop is plain gradient descent; say so rather than ignore the key (PaddleRec did).
        raise error(config, "hyper_parameters.base_optimizer.class", "only SGD is supported for the inner loop")
    first_order = boolean(config, "hyper_parameters.first_order")
    # Derivative-order annealing (MAML++): cheap first-order epochs first, then the exact meta-gradient.
    first_order = first_order or epoch < nonnegative_int(config, "hyper_parameters.first_order_epochs")
    return InnerSettings(steps, lr, first_order or not training)


def multi_step_weights(config, epoch):
    """{stage: weight} of the query losses in the meta-objective during `epoch` (see maml.meta_gradients).

    MAML: only the last stage. Multi-step loss (MAML++): every stage after an inner step, equal weights at
    epoch 0 moving linearly to all on the last stage at epoch multi_step_loss_epochs (plain MAML from then
    on); the early stages' losses give the first layers a direct signal while training is young.
    """
    steps = inner_settings(config, training=True, epoch=epoch).steps
    anneal_epochs = nonnegative_int(config, "hyper_parameters.multi_step_loss_epochs")
    if anneal_epochs == 0 or steps <= 1:
        return {steps: 1.0}
    last_share = min(1.0, epoch / anneal_epochs)
    weights = {stage: (1.0 - last_share) / steps for stage in range(1, steps + 1)}
    weights[steps] += last_share
    return {stage: w for stage, w in weights.items() if w > 0}


def meta_steps(config):
    """Meta-batches in the whole run: runner.epochs x ceil(runner.tasks_per_epoch / runner.train_batch_size)."""
    batches = -(-positive_int(config, "runner.tasks_per_epoch") // positive_int(config, "runner.train_batch_size"))
    return positive_int(config, "runner.epochs") * batches
