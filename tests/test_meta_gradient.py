"""The meta-gradient of the whole network: second order against float64 central differences of the
meta-objective, first order against its definition, the batched path against one task at a time, and the
trainer's backward/step flow applying exactly the meta-gradient."""
import numpy as np
import paddle
import pytest

from tests import maml_modules
from tests.maml_modules import central_difference, directional, float64, relative_error

dygraph_model, net, maml, _ = maml_modules.load()

STEPS, LR, TASKS, WAYS = 2, 0.3, 3, 3
CONFIG = {
    "hyper_parameters.n_way": WAYS, "hyper_parameters.update_step": STEPS, "hyper_parameters.bn_channel": 4,
    "hyper_parameters.imgsize": 16, "hyper_parameters.base_optimizer.learning_rate": LR,
    # The reference objectives here normalise the query images with their own statistics, as MAML does;
    # tests/test_norm_mode.py checks the other modes against theirs.
    "hyper_parameters.norm_mode": "transductive",
}
FIRST_ORDER = dict(CONFIG, **{"hyper_parameters.first_order": True})


def _batch(seed=1, tasks=TASKS):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((tasks, WAYS, 1, 16, 16)), np.tile(np.arange(WAYS), (tasks, 1)),
            rng.standard_normal((tasks, 2 * WAYS, 1, 16, 16)), np.tile(np.arange(WAYS).repeat(2), (tasks, 1))]


def _model():
    paddle.seed(0)
    return dygraph_model.DygraphModel().create_model(CONFIG)


def _task(batch, t):
    return [part[t:t + 1] for part in batch]


def _one_task_objective(model, task_batch):
    """Query loss of one task after STEPS SGD steps on its support set, written plainly, one task at a time:
    independent of the batched meta_gradients code path. The value is all the finite differences need."""
    ep = maml.MetaBatch(*task_batch, dtype="float64")
    params = net.expand_to_tasks(model.parameters(), 1)
    for _ in range(STEPS):
        support_loss, _ = net.task_losses(params, ep.x_spt, ep.y_spt)
        grads = paddle.grad(support_loss.sum(), params)
        params = [p.detach() - LR * g for p, g in zip(params, grads)]
        for p in params:
            p.stop_gradient = False
    query_loss, _ = net.task_losses(params, ep.x_qry, ep.y_qry)
    return float(query_loss.sum()), params, query_loss.sum()


def _meta_objective(model, batch, values):
    for p, v in zip(model.parameters(), values):
        p.set_value(v)
    return np.mean([_one_task_objective(model, _task(batch, t))[0] for t in range(TASKS)])


def test_second_order_meta_gradient_matches_central_differences():
    with float64():
        model, batch = _model(), _batch()
        _, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, CONFIG)
        base = [p.numpy().copy() for p in model.parameters()]
        rng = np.random.default_rng(7)
        for _ in range(3):
            direction = [rng.standard_normal(b.shape) for b in base]
            fd = central_difference(lambda v: _meta_objective(model, batch, v), base, direction)
            assert relative_error(directional([g.numpy() for g in grads], direction), fd) < 1e-6


def test_first_order_equals_its_definition():
    """FOMAML: the mean over tasks of the query-loss gradient at each task's adapted parameters."""
    with float64():
        model, batch = _model(), _batch()
        _, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, FIRST_ORDER)
        expected = None
        for t in range(TASKS):
            _, adapted, query_loss = _one_task_objective(model, _task(batch, t))
            per_task = paddle.grad(query_loss, adapted)
            # parameters come in task-stacked layout with T=1: fc weight/bias have a leading task axis
            per_task = [g.reshape(p.shape).numpy() for g, p in zip(per_task, model.parameters())]
            expected = per_task if expected is None else [e + g for e, g in zip(expected, per_task)]
        for g, e in zip(grads, expected):
            np.testing.assert_allclose(g.numpy(), e / TASKS, rtol=1e-10, atol=1e-12)


def test_second_order_differs_from_first_order():
    """The silent failure of a Paddle MAML is a 'second-order' gradient equal to the first-order one."""
    with float64():
        model, batch = _model(), _batch()
        _, second = dygraph_model.DygraphModel.meta_gradients(model, batch, CONFIG)
        _, first = dygraph_model.DygraphModel.meta_gradients(model, batch, FIRST_ORDER)
        for g2, g1, p in zip(second, first, model.parameters()):
            diff = np.linalg.norm(g2.numpy() - g1.numpy()) / np.linalg.norm(g2.numpy())
            assert diff > 1e-3, f"second-order gradient of {p.name} equals the first-order one"


@pytest.mark.parametrize("config", [CONFIG, FIRST_ORDER], ids=["second_order", "first_order"])
def test_batched_tasks_equal_one_task_at_a_time(config):
    with float64():
        model, batch = _model(), _batch()
        loss, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, config)
        singles = [dygraph_model.DygraphModel.meta_gradients(model, _task(batch, t), config) for t in range(TASKS)]
        assert float(loss) == pytest.approx(np.mean([float(s[0]) for s in singles]), rel=1e-12)
        for i, g in enumerate(grads):
            np.testing.assert_allclose(g.numpy(), np.mean([s[1][i].numpy() for s in singles], axis=0),
                                       rtol=1e-9, atol=1e-12)


def test_trainer_flow_applies_exactly_the_meta_gradient():
    """loss, ... = train_forward(...); loss.backward() must leave the meta-gradient in .grad, and the
    loss value must be the query loss; meta_gradients itself must leave .grad alone."""
    with float64():
        plugin = dygraph_model.DygraphModel()
        model, batch = _model(), _batch()
        query_loss, grads = plugin.meta_gradients(model, batch, CONFIG)
        assert all(p.grad is None for p in model.parameters())
        loss, _, printed = plugin.train_forward(model, plugin.create_metrics()[0], batch, CONFIG)
        assert float(loss) == pytest.approx(float(query_loss), rel=1e-12)
        assert float(printed["loss"]) == pytest.approx(float(query_loss), rel=1e-12)
        loss.backward()
        for p, g in zip(model.parameters(), grads):
            np.testing.assert_allclose(p.grad.numpy(), g.numpy(), rtol=1e-12, atol=1e-15)
        optimizer = paddle.optimizer.SGD(learning_rate=0.5, parameters=model.parameters())
        before = [p.numpy().copy() for p in model.parameters()]
        optimizer.step()
        for p, b, g in zip(model.parameters(), before, grads):
            np.testing.assert_allclose(p.numpy(), b - 0.5 * g.numpy(), rtol=1e-12, atol=1e-15)


def test_float32_default_dtype_runs():
    model, batch = _model(), _batch()
    loss, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, CONFIG)
    assert np.isfinite(float(loss)) and all(np.isfinite(g.numpy()).all() for g in grads)
    assert grads[0].dtype == paddle.float32


def test_production_paths_match_central_differences():
    """The sizes above are too small for the fast paths. Here 8 channels per group, 9 query images and 6 tasks
    make the convolutions run split over two threads (on the batch axis and on task groups) and the
    meta-batch run in more than one chunk; the meta-gradient must still match the finite differences."""
    _, _, _, kernels = maml_modules.load()
    if kernels.conv_threads() < 2:
        pytest.skip("MAML_CONV_THREADS=1: convolutions are not split")
    config = dict(CONFIG, **{"hyper_parameters.bn_channel": 8})
    tasks = 6
    assert tasks > maml.TASKS_PER_CHUNK
    rng = np.random.default_rng(3)
    batch = [rng.standard_normal((tasks, WAYS, 1, 16, 16)), np.tile(np.arange(WAYS), (tasks, 1)),
             rng.standard_normal((tasks, 3 * WAYS, 1, 16, 16)), np.tile(np.arange(WAYS).repeat(3), (tasks, 1))]
    with float64():
        paddle.seed(0)
        model = dygraph_model.DygraphModel().create_model(config)
        with kernels.recording_convolutions() as calls:
            _, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, config)
        plans = {plan for _, _, _, plan in calls}
        assert {"batch", "groups"} <= plans, plans
        base = [p.numpy().copy() for p in model.parameters()]

        def objective(values):
            for p, v in zip(model.parameters(), values):
                p.set_value(v)
            return np.mean([_one_task_objective(model, _task(batch, t))[0] for t in range(tasks)])

        for seed in range(2):
            direction = [np.random.default_rng(seed).standard_normal(b.shape) for b in base]
            # a smaller step than elsewhere: at these sizes 1e-6 crosses ReLU / max-pool kinks (error ~2e-4)
            fd = central_difference(objective, base, direction, eps=1e-7)
            assert relative_error(directional([g.numpy() for g in grads], direction), fd) < 1e-6


def test_evaluation_in_chunks_equals_the_whole_batch(monkeypatch):
    with float64():
        model, batch = _model(), _batch(tasks=5)
        episode = maml.MetaBatch(*batch, dtype="float64")
        whole = maml.evaluate(model, episode, STEPS, LR).numpy()
        monkeypatch.setattr(maml, "EVAL_QUERY_IMAGES_PER_CHUNK", 2 * episode.x_qry.shape[1])  # chunks of 2 tasks
        chunked = maml.evaluate(model, episode, STEPS, LR).numpy()
        assert chunked.shape == (5,)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
