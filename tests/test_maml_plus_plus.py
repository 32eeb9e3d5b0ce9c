"""The MAML++ options (Antoniou et al., 2019): each one changes the computation in the way it should, its
meta-gradient matches float64 central differences of the objective it defines (written here plainly, one
task at a time, independent of the batched code), and switched off it is plain MAML exactly."""
import numpy as np
import paddle
import pytest

from tests import maml_modules
from tests.maml_modules import central_difference, directional, float64, relative_error

dygraph_model, net, maml, _ = maml_modules.load()
Plugin = dygraph_model.DygraphModel

STEPS, LR, TASKS, WAYS = 2, 0.3, 2, 3
CONFIG = {
    "hyper_parameters.n_way": WAYS, "hyper_parameters.update_step": STEPS, "hyper_parameters.bn_channel": 4,
    "hyper_parameters.imgsize": 16, "hyper_parameters.base_optimizer.learning_rate": LR,
    # The reference objectives here normalise the query images with their own statistics, as MAML does;
    # tests/test_norm_mode.py checks the other modes against theirs.
    "hyper_parameters.norm_mode": "transductive",
}
MSL, LSLR, BNWB = ("hyper_parameters.multi_step_loss_epochs", "hyper_parameters.learn_inner_lr",
                   "hyper_parameters.per_step_bn")


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((TASKS, WAYS, 1, 16, 16)), np.tile(np.arange(WAYS), (TASKS, 1)),
            rng.standard_normal((TASKS, 2 * WAYS, 1, 16, 16)), np.tile(np.arange(WAYS).repeat(2), (TASKS, 1))]


def _model(config):
    paddle.seed(0)
    return Plugin().create_model(config)


def _plain_objective(model, batch, stage_weights, per_step_bn):
    """The MAML++ meta-objective from the named parameters, one task at a time: SGD on the support loss with
    the fixed rate or the learned `inner_lr[step, tensor]`; stage s normalises with bn row min(s, last) when
    per_step_bn; the weighted query losses after the stages in `stage_weights`, averaged over tasks."""
    named = dict(model.named_parameters())
    layer_names = [n for n in named if n != "inner_lr"]
    adapted = [n for n in layer_names if not (per_step_bn and n.startswith("bn"))]
    total = 0.0
    for t in range(TASKS):
        ep = maml.MetaBatch(*[part[t:t + 1] for part in batch], dtype="float64")
        fast = {n: named[n] for n in adapted}

        def network_params(stage):
            return [fast[n] if n in fast else named[n][min(stage, named[n].shape[0] - 1)] for n in layer_names]

        def loss(params, x, y):
            return net.task_losses(net.expand_to_tasks(params, 1), x, y)[0].sum()

        for step in range(max(stage_weights) + 1):
            if step in stage_weights:
                total += stage_weights[step] * float(loss(network_params(step), ep.x_qry, ep.y_qry))
            if step == max(stage_weights):
                break
            # (every input asked for: Paddle's custom ops must not be asked for a gradient that leads nowhere)
            params = network_params(step)
            grads = dict(zip(layer_names, paddle.grad(loss(params, ep.x_spt, ep.y_spt), params)))
            rates = ([named["inner_lr"][min(step, named["inner_lr"].shape[0] - 1), i] for i in range(len(adapted))]
                     if "inner_lr" in named else [LR] * len(adapted))
            fast = {n: (fast[n] - r * grads[n]).detach() for n, r in zip(adapted, rates)}
            for p in fast.values():
                p.stop_gradient = False
    return total / TASKS


def _check_against_finite_differences(config, stage_weights, epoch=0, directions=2):
    with float64():
        model, batch = _model(config), _batch()
        loss, grads = Plugin.meta_gradients(model, batch, config, epoch=epoch)
        base = [p.numpy().copy() for p in model.parameters()]

        def objective(values):
            for p, v in zip(model.parameters(), values):
                p.set_value(v)
            return _plain_objective(model, batch, stage_weights, bool(config.get(BNWB)))

        assert float(loss) == pytest.approx(objective(base), rel=1e-10)
        for seed in range(directions):
            direction = [np.random.default_rng(seed).standard_normal(b.shape) for b in base]
            fd = central_difference(objective, base, direction, eps=1e-7)
            assert relative_error(directional([g.numpy() for g in grads], direction), fd) < 1e-6
        objective(base)  # leave the model as it was
        return model, grads


def test_multi_step_loss_weights_anneal_to_the_last_stage():
    config = dict(CONFIG, **{MSL: 4, "hyper_parameters.update_step": 4})
    assert maml_modules.settings().multi_step_weights(config, 0) == pytest.approx({1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25})
    assert maml_modules.settings().multi_step_weights(config, 2) == pytest.approx({1: 0.125, 2: 0.125, 3: 0.125, 4: 0.625})
    assert maml_modules.settings().multi_step_weights(config, 4) == {4: 1.0}
    assert maml_modules.settings().multi_step_weights(config, 9) == {4: 1.0}
    assert maml_modules.settings().multi_step_weights(CONFIG, 0) == {STEPS: 1.0}  # off by default


def test_multi_step_loss_matches_central_differences():
    config = dict(CONFIG, **{MSL: 2})
    _check_against_finite_differences(config, {1: 0.5, 2: 0.5}, epoch=0)
    _check_against_finite_differences(config, {1: 0.25, 2: 0.75}, epoch=1, directions=1)


def test_multi_step_loss_changes_the_gradient_and_ends_as_plain_maml():
    with float64():
        model, batch = _model(CONFIG), _batch()
        _, plain = Plugin.meta_gradients(model, batch, CONFIG)
        config = dict(CONFIG, **{MSL: 2})
        _, early = Plugin.meta_gradients(model, batch, config, epoch=0)
        _, late = Plugin.meta_gradients(model, batch, config, epoch=2)
    assert max(np.abs(e.numpy() - p.numpy()).max() for e, p in zip(early, plain)) > 1e-4
    for g, p in zip(late, plain):
        np.testing.assert_array_equal(g.numpy(), p.numpy())


def test_learned_inner_rates_match_central_differences_and_receive_gradients():
    config = dict(CONFIG, **{LSLR: True})
    model, grads = _check_against_finite_differences(config, {STEPS: 1.0})
    names = [n for n, _ in model.named_parameters()]
    assert names[-1] == "inner_lr" and model.inner_lr.shape == [STEPS, 14]  # 4 blocks x (conv, gamma, beta) + fc weight, bias
    np.testing.assert_allclose(model.inner_lr.numpy(), LR)
    rate_grads = grads[-1].numpy()
    assert (np.abs(rate_grads) > 1e-8).all(), rate_grads


def test_learned_inner_rates_at_their_initial_value_give_plain_maml_gradients():
    with float64():
        batch = _batch()
        _, plain = Plugin.meta_gradients(_model(CONFIG), batch, CONFIG)
        _, learned = Plugin.meta_gradients(_model(dict(CONFIG, **{LSLR: True})), batch, dict(CONFIG, **{LSLR: True}))
    assert len(learned) == len(plain) + 1
    for g, p in zip(learned, plain):
        np.testing.assert_allclose(g.numpy(), p.numpy(), rtol=1e-10, atol=1e-14)


def test_per_step_batch_norm_matches_central_differences_and_every_stage_is_used():
    config = dict(CONFIG, **{BNWB: True})
    model, grads = _check_against_finite_differences(config, {STEPS: 1.0})
    named = [n for n, _ in model.named_parameters()]
    assert list(model.parameters())[1].shape == [STEPS + 1, 4]
    for name, g in zip(named, grads):
        if name.startswith("bn"):
            assert (np.abs(g.numpy()).sum(axis=1) > 1e-8).all(), f"{name}: a stage's row has no gradient"
    assert len(model.adapted_parameters()) == 4 + 2  # the convs and the classifier


def test_all_options_together_match_central_differences():
    config = dict(CONFIG, **{MSL: 3, LSLR: True, BNWB: True})
    _check_against_finite_differences(config, {1: 0.5, 2: 0.5}, epoch=0, directions=1)


def test_options_off_are_plain_maml():
    off = dict(CONFIG, **{MSL: 0, LSLR: False, BNWB: False, "hyper_parameters.first_order_epochs": 0,
                          "hyper_parameters.meta_optimizer.cosine_annealing": False})
    with float64():
        batch = _batch()
        model = _model(off)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in _model(CONFIG).named_parameters()]
        _, grads = Plugin.meta_gradients(model, batch, off, epoch=5)
        _, plain = Plugin.meta_gradients(_model(CONFIG), batch, CONFIG)
    for g, p in zip(grads, plain):
        np.testing.assert_array_equal(g.numpy(), p.numpy())
    _check_against_finite_differences(off, {STEPS: 1.0}, directions=1)


def test_first_order_epochs_switch_to_second_order():
    config = dict(CONFIG, **{"hyper_parameters.first_order_epochs": 2})
    first_order = dict(CONFIG, **{"hyper_parameters.first_order": True})
    with float64():
        model, batch = _model(CONFIG), _batch()
        early = Plugin.meta_gradients(model, batch, config, epoch=1)[1]
        late = Plugin.meta_gradients(model, batch, config, epoch=2)[1]
        fo = Plugin.meta_gradients(model, batch, first_order)[1]
        so = Plugin.meta_gradients(model, batch, CONFIG)[1]
    for e, f in zip(early, fo):
        np.testing.assert_array_equal(e.numpy(), f.numpy())
    for lt, s in zip(late, so):
        np.testing.assert_array_equal(lt.numpy(), s.numpy())
    assert max(np.abs(f.numpy() - s.numpy()).max() for f, s in zip(fo, so)) > 1e-4


def test_cosine_annealing_of_the_meta_rate():
    config = dict(CONFIG, **{"hyper_parameters.meta_optimizer.cosine_annealing": True,
                             "hyper_parameters.meta_optimizer.learning_rate": 0.002, "runner.epochs": 2,
                             "runner.tasks_per_epoch": 90, "runner.train_batch_size": 32})
    plugin = Plugin()
    model = plugin.create_model(config)
    optimizer = plugin.create_optimizer(model, config)
    scheduler = optimizer._learning_rate
    rates = []
    for _ in range(7):  # 2 epochs x ceil(90 / 32) = 6 meta-batches, then one past the end
        rates.append(optimizer.get_lr())
        scheduler.step()
    assert rates[0] == pytest.approx(0.002)
    assert rates[3] == pytest.approx((0.002 + 0.00002) / 2)
    assert rates[6] == pytest.approx(0.00002)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    scheduler.step()
    assert optimizer.get_lr() == pytest.approx(0.00002)  # stays at the floor past the planned end
    fixed = plugin.create_optimizer(model, CONFIG)
    assert not isinstance(fixed._learning_rate, paddle.optimizer.lr.LRScheduler)


@pytest.mark.parametrize("key, value, message", [
    (LSLR, "yes", "must be true or false"),
    (BNWB, 1, "must be true or false"),
    (MSL, -1, "must be a non-negative integer"),
    ("hyper_parameters.first_order_epochs", 1.5, "must be a non-negative integer"),
])
def test_bad_option_values_are_named(key, value, message):
    config = dict(CONFIG, **{key: value})
    with pytest.raises(ValueError, match=f"{key}: {message}"):
        plugin = Plugin()
        plugin.create_model(config)
        Plugin.meta_gradients(_model(CONFIG), _batch(), config)


def test_learned_rates_need_an_inner_step():
    with pytest.raises(ValueError, match="learn_inner_lr: needs hyper_parameters.update_step >= 1"):
        Plugin().create_model(dict(CONFIG, **{LSLR: True, "hyper_parameters.update_step": 0}))
