"""hyper_parameters.norm_mode's non-transductive modes: "support" (query images normalised with the support set's
moments) and "tasknorm_i" (those blended with each image's own, support images included).

A query image's probabilities must not depend on the other query images in these modes (they do in the
transductive one, which stays MAML's); "support" normalises the support set alone as before; the meta-gradient is
exact to second order against float64 central differences of an objective written here plainly (its network
with Paddle's own layers, one image at a time, independent of net.py); and the tools train, evaluate and
predict in each mode."""
import json
import os
import shutil

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from tests import maml_modules
from tests.maml_modules import central_difference, directional, float64, relative_error
from tests.test_meta_gradient import CONFIG as META_GRADIENT_CONFIG
from tests.test_meta_gradient import LR, STEPS, TASKS, _batch
from tool_helpers import REPO_ROOT, assert_ok, assert_user_error, run_tool

dygraph_model, net, maml, ops = maml_modules.load()
onednn_layers = ops.onednn_layers  # the plugin's own (see maml_modules.load)
Plugin = dygraph_model.DygraphModel
MODE = "hyper_parameters.norm_mode"
NEW_MODES = ["support", "tasknorm_i"]  # each query image on its own

# test_meta_gradient's small network and meta-batch, in the first new mode
CONFIG = dict(META_GRADIENT_CONFIG, **{MODE: NEW_MODES[0]})


def _model(config):
    paddle.seed(0)
    return Plugin().create_model(config)


# ----- a query image classified alone or with others -----
# 16 channels and 28 x 28 images: in float32 the activations then take oneDNN's blocked layout where it has one.
SMALL_NET = {"hyper_parameters.n_way": 5, "hyper_parameters.bn_channel": 16, "hyper_parameters.imgsize": 28,
             "hyper_parameters.update_step_test": 3, "hyper_parameters.base_optimizer.learning_rate": 0.4}


def _images(rng, n):
    return rng.uniform(-1.0, 1.0, (n, 1, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("blocked", ["1", "0"], ids=["blocked_layout", "plain_layout"])
def test_query_probabilities_do_not_depend_on_the_other_queries(monkeypatch, blocked):
    monkeypatch.setenv("MAML_ONEDNN_BLOCKED", blocked)
    few_shot = dygraph_model.few_shot  # the plugin's own: a plain import could find another folder's net

    rng = np.random.default_rng(5)
    support, labels, queries = _images(rng, 10), np.arange(5).repeat(2), _images(rng, 51)
    spread = {}
    for mode in NEW_MODES + ["transductive"]:
        config = dict(SMALL_NET, **{MODE: mode})
        model = _model(config)
        alone = few_shot.adapt_and_classify(model, config, support, labels, queries[:1])[0]
        with_others = [few_shot.adapt_and_classify(model, config, support, labels, queries[:1 + others])[0]
                       for others in (5, 50)]
        assert alone.shape == (5,)
        spread[mode] = max(np.abs(p - alone).max() for p in with_others)
    assert spread["support"] < 1e-5 and spread["tasknorm_i"] < 1e-5, spread
    assert spread["transductive"] > 1e-3, spread  # so the check above can tell the modes apart


@pytest.mark.parametrize("blocked", ["1", "0"], ids=["blocked_layout", "plain_layout"])
def test_support_statistics_normalise_the_support_set_as_before(monkeypatch, blocked):
    """Query images that are the support images themselves get exactly what the support set gets alone with
    its own batch statistics: the moments taken over the support rows are batch norm's."""
    monkeypatch.setenv("MAML_ONEDNN_BLOCKED", blocked)
    model = _model(dict(SMALL_NET, **{MODE: "support"}))
    x = paddle.to_tensor(np.random.default_rng(2).uniform(-1, 1, (2, 6, 1, 28, 28)).astype(np.float32))
    params = net.expand_to_tasks(model.adapted_parameters(), 2)
    with paddle.no_grad():
        own = net.task_logits(params, x).numpy()
        by_support = net.task_logits(params, x, support=x).numpy()
    assert by_support.shape == own.shape == (2, 6, 5)
    np.testing.assert_allclose(by_support, own, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["blocked", "plain"])
def test_batch_norm_by_support_matches_its_definition(layout):
    """The fused op of "support" mode against its definition in plain Paddle ops (net.batch_norm_by_rows):
    outputs and first derivatives in x, gamma and beta, the support rows' share included."""
    rng = np.random.default_rng(3)
    dtype = "float32" if layout == "blocked" else "float64"  # oneDNN's blocked kernels are float32 ones

    def tensor(shape, scale=1.0):
        return paddle.to_tensor((rng.standard_normal(shape) * scale + (1.0 if len(shape) == 1 else 0.0)).astype(dtype),
                                stop_gradient=False)

    x, gamma, beta = tensor([9, 32, 6, 6], 2.0), tensor([32], 0.3), tensor([32], 0.3)
    if layout == "blocked":
        x = paddle.to_tensor(onednn_layers.blocked(x, 16).numpy(), stop_gradient=False)
    dy = paddle.to_tensor(rng.standard_normal(x.shape).astype(dtype))
    results = []
    for norm in (ops.batch_norm_by_support, net.batch_norm_by_rows):
        out = norm(x, gamma, beta, 4)
        results.append([out.numpy()] + [g.numpy() for g in paddle.grad((out * dy).sum(), [x, gamma, beta])])
    tolerance = 2e-4 if dtype == "float32" else 1e-10
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    if layout == "blocked":  # TaskNorm-I's instance moments in the blocked layout: those of the plain one, blocked
        alpha = paddle.to_tensor(0.3, dtype=dtype)
        plain = onednn_layers.plain(x.detach())
        np.testing.assert_allclose(net.batch_norm_by_rows(x, gamma, beta, 4, alpha).numpy(),
                                   onednn_layers.blocked(net.batch_norm_by_rows(plain, gamma, beta, 4, alpha),
                                                             16).numpy(), rtol=tolerance, atol=tolerance)


def test_batch_norm_by_support_refuses_a_second_derivative():
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal([5, 4, 3, 3]), stop_gradient=False)
    gamma = paddle.to_tensor(np.ones(4), stop_gradient=False)
    # (every input asked for: Paddle's custom ops must not be asked for a gradient that leads nowhere)
    _, dgamma = paddle.grad((ops.batch_norm_by_support(x, gamma, gamma * 0, 2) ** 2).sum(), [x, gamma],
                            create_graph=True)
    with pytest.raises(Exception, match="no second derivative"):
        paddle.grad(dgamma.sum(), [x])


def test_support_mode_is_the_default_and_a_bad_mode_is_one_error():
    # The default is what predict uses for a config that does not say: a prediction that does not depend on the
    # other query images.
    config = {key: value for key, value in CONFIG.items() if key != MODE}
    assert _model(config).norm == "support"
    with pytest.raises(ValueError, match=f"{MODE}: must be one of 'transductive', 'support', 'tasknorm_i'"):
        _model(dict(CONFIG, **{MODE: "supprt"}))


# ----- the meta-gradient -----
def _reference_logits(params, support, images, blend=None):
    """Logits of one task's `images`, each on its own, written with Paddle's layers on plain parameters
    {name: tensor}: every batch norm takes the moments of the `support` images under the same parameters, with
    `blend` [blocks, 2] (TaskNorm-I) mixed with the image's own moments over H, W with weight
    alpha = sigmoid(scale * support images + offset) on the support's."""
    def norm(h, mean, variance, b):
        if blend is not None:
            alpha = F.sigmoid(blend[b, 0] * support.shape[0] + blend[b, 1])
            own_mean = h.mean(axis=[2, 3], keepdim=True)
            own_variance = ((h - own_mean) ** 2).mean(axis=[2, 3], keepdim=True)
            mixed = alpha * mean + (1 - alpha) * own_mean
            variance = alpha * (variance + (mean - mixed) ** 2) + (1 - alpha) * (own_variance + (own_mean - mixed) ** 2)
            mean = mixed
        gamma, beta = (params[name].reshape([1, -1, 1, 1]) for name in net.block_names(b)[1:])
        return (h - mean) / paddle.sqrt(variance + 1e-5) * gamma + beta

    logits = []
    for image in images:
        context, h = support, image[None]
        for b in range(4):
            weight = params[net.block_names(b).conv]
            context, h = F.conv2d(context, weight, padding=1), F.conv2d(h, weight, padding=1)
            mean = context.mean(axis=[0, 2, 3], keepdim=True)
            variance = ((context - mean) ** 2).mean(axis=[0, 2, 3], keepdim=True)
            context, h = [F.relu(F.max_pool2d(norm(x, mean, variance, b), 2)) for x in (context, h)]
        logits.append(paddle.matmul(h.reshape([1, -1]), params["fc_weight"]) + params["fc_bias"])
    return paddle.concat(logits, axis=0)


def _meta_objective(model, batch, values):
    """The mean query loss after STEPS SGD steps on each task's support set, one task at a time, with
    _reference_logits. The support set is normalised with its own moments (TaskNorm-I: blended, as the query
    images). With per-step batch norm, stage s (after s steps) uses the bn rows min(s, last), not adapted."""
    for p, v in zip(model.parameters(), values):
        p.set_value(v)
    named = dict(model.named_parameters())
    blend = named.get("tasknorm")
    total = 0.0
    for t in range(TASKS):
        x_spt, y_spt, x_qry, y_qry = (paddle.to_tensor(part[t]) for part in batch)
        x_spt, x_qry = x_spt.astype("float64"), x_qry.astype("float64")
        fast = {name: named[name] for name in model.adapted_names}

        def stage_params(stage):
            return {n: fast[n] if n in fast else named[n][min(stage, named[n].shape[0] - 1)]
                    for n in net.layer_names(4)}

        for step in range(STEPS):
            loss = F.cross_entropy(_reference_logits(stage_params(step), x_spt, x_spt, blend), y_spt.unsqueeze(-1))
            grads = paddle.grad(loss, list(fast.values()))
            fast = {n: (p - LR * g).detach() for (n, p), g in zip(fast.items(), grads)}
            for p in fast.values():
                p.stop_gradient = False
        with paddle.no_grad():
            logits = _reference_logits(stage_params(STEPS), x_spt, x_qry, blend)
            total += float(F.cross_entropy(logits, y_qry.unsqueeze(-1)))
    return total / TASKS


@pytest.mark.parametrize("extra", [{}, {"hyper_parameters.per_step_bn": True}], ids=["maml", "per_step_bn"])
@pytest.mark.parametrize("mode", NEW_MODES)
def test_second_order_meta_gradient_matches_central_differences(mode, extra):
    config = dict(CONFIG, **{MODE: mode}, **extra)
    with float64():
        model, batch = _model(config), _batch()
        if model.tasknorm is not None:  # blend weights other than 1/2, different per block
            model.tasknorm.set_value(np.random.default_rng(4).uniform(-0.5, 0.5, model.tasknorm.shape))
        loss, grads = Plugin.meta_gradients(model, batch, config)
        base = [p.numpy().copy() for p in model.parameters()]

        def objective(values):
            return _meta_objective(model, batch, values)

        assert float(loss) == pytest.approx(objective(base), rel=1e-10)
        for seed in range(3):
            direction = [np.random.default_rng(seed).standard_normal(b.shape) for b in base]
            # a small step: 1e-6 crossed a ReLU / max-pool kink here (error 1.5e-3 on a correct gradient)
            fd = central_difference(objective, base, direction, eps=1e-7)
            assert relative_error(directional([g.numpy() for g in grads], direction), fd) < 1e-6


@pytest.mark.parametrize("mode", NEW_MODES)
def test_second_order_differs_from_first_order(mode):
    config = dict(CONFIG, **{MODE: mode})
    with float64():
        model, batch = _model(config), _batch()
        _, second = Plugin.meta_gradients(model, batch, config)
        _, first = Plugin.meta_gradients(model, batch, dict(config, **{"hyper_parameters.first_order": True}))
        for g2, g1, p in zip(second, first, model.parameters()):
            diff = np.linalg.norm(g2.numpy() - g1.numpy()) / np.linalg.norm(g2.numpy())
            assert diff > 1e-3, f"second-order gradient of {p.name} equals the first-order one"


@pytest.mark.parametrize("mode", NEW_MODES)
def test_chunks_of_tasks_equal_the_whole_batch(monkeypatch, mode):
    chunks = "hyper_parameters.tasks_per_chunk"
    config = dict(CONFIG, **{MODE: mode})
    with float64():
        model, batch = _model(config), _batch(tasks=5)
        loss, grads = Plugin.meta_gradients(model, batch, dict(config, **{chunks: 5}))
        chunked_loss, chunked = Plugin.meta_gradients(model, batch, dict(config, **{chunks: 2}))
        assert float(chunked_loss) == pytest.approx(float(loss), rel=1e-12)
        for g, c in zip(grads, chunked):
            np.testing.assert_allclose(c.numpy(), g.numpy(), rtol=1e-9, atol=1e-12)
        episode = maml.MetaBatch(*batch, dtype="float64")
        whole = maml.evaluate(model, episode, STEPS, LR).numpy()
        monkeypatch.setattr(maml, "EVAL_QUERY_IMAGES_PER_CHUNK", 2 * (episode.x_qry.shape[1] + episode.x_spt.shape[1]))
        np.testing.assert_allclose(maml.evaluate(model, episode, STEPS, LR).numpy(), whole, rtol=0, atol=1e-12)


# ----- the tools, end to end on the shipped synthetic sample -----
MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
SAMPLE_CLASS = os.path.join(MAML_DIR, "data", "test", "alphabet_05", "character01")
TOOLS_SMALL = ["runner.train_batch_size=4", "runner.tasks_per_epoch=8", "runner.infer_batch_size=5",
               "runner.infer_tasks=10", "hyper_parameters.k_query=3", "hyper_parameters.update_step=1",
               "hyper_parameters.update_step_test=3", "hyper_parameters.bn_channel=8", "runner.print_interval=1",
               "runner.epochs=1", "runner.infer_start_epoch=0", "runner.infer_end_epoch=1"]


@pytest.mark.parametrize("mode", NEW_MODES)
def test_train_infer_and_predict_in_the_mode(tmp_path, mode):
    config = os.path.join(MAML_DIR, "config.yaml")
    overrides = [f"runner.model_save_path={tmp_path / 'out'}", f"runner.infer_load_path={tmp_path / 'out'}",
                 *TOOLS_SMALL, f"{MODE}={mode}"]
    assert_ok(run_tool("trainer.py", "-m", config, "-o", *overrides))
    inferred = run_tool("infer.py", "-m", config, "-o", *overrides)
    assert_ok(inferred)
    assert f"query images batch normalised {mode} (" in inferred.stdout + inferred.stderr
    drawings = sorted(os.listdir(SAMPLE_CLASS))
    os.makedirs(tmp_path / "support" / "character01")
    shutil.copy(os.path.join(SAMPLE_CLASS, drawings[0]), tmp_path / "support" / "character01")
    predicted = run_tool("predict.py", "-m", config, "--support", tmp_path / "support",
                         "--query", os.path.join(SAMPLE_CLASS, drawings[1]), "--json", tmp_path / "p.json",
                         "-o", *overrides)
    assert_ok(predicted)
    with open(tmp_path / "p.json") as handle:
        assert json.load(handle)["settings"]["norm_mode"] == mode
    assert f"norm_mode: {mode}" in predicted.stdout + predicted.stderr


def test_a_bad_norm_mode_is_one_line_naming_the_key(tmp_path):
    process = run_tool("trainer.py", "-m", os.path.join(MAML_DIR, "config.yaml"), "-o",
                       f"runner.model_save_path={tmp_path / 'out'}", *TOOLS_SMALL, f"{MODE}=batch")
    assert_user_error(process, "config.yaml", MODE, "'transductive', 'support', 'tasknorm_i'")
    assert not os.path.exists(tmp_path / "out" / "0")


def test_the_checkpoint_records_its_norm_mode_and_loading_it_in_another_warns(tmp_path):
    # The mode is not visible in the parameters (support and transductive have the same ones): the checkpoint's
    # meta.json records it, and infer or predict under another mode says so, since the accuracy then changes.
    config = os.path.join(MAML_DIR, "config.yaml")
    overrides = [f"runner.model_save_path={tmp_path / 'out'}", f"runner.infer_load_path={tmp_path / 'out'}",
                 *TOOLS_SMALL]
    assert_ok(run_tool("trainer.py", "-m", config, "-o", *overrides))  # the default mode
    with open(tmp_path / "out" / "0" / "meta.json") as handle:
        assert json.load(handle)["extra"]["settings"] == {MODE: "support"}
    same = run_tool("infer.py", "-m", config, "-o", *overrides)
    assert_ok(same)
    assert "trained with" not in same.stdout + same.stderr
    other = run_tool("infer.py", "-m", config, "-o", *overrides, f"{MODE}=transductive")
    assert_ok(other)
    warning = [line for line in (other.stdout + other.stderr).splitlines() if "trained with" in line]
    assert len(warning) == 1 and "WARNING" in warning[0], warning
    assert f"{tmp_path / 'out' / '0' / 'meta.json'}: trained with {MODE} = 'support', loaded with 'transductive'" in warning[0]
