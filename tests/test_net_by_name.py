"""net.py keys the parameters by name: task_logits reads them by name (their order in a mapping does not
matter), a plain list in MAMLNet's order is accepted and named, and the MAML++ options pick their tensors
by name."""
import numpy as np
import paddle
import pytest

from tests import maml_modules

plugin, net, maml, _ = maml_modules.load()

CONFIG = {"hyper_parameters.n_way": 3, "hyper_parameters.update_step": 2, "hyper_parameters.bn_channel": 4,
          "hyper_parameters.imgsize": 16}


def _model(**options):
    paddle.seed(0)
    return plugin.DygraphModel().create_model(dict(CONFIG, **options))


def test_task_logits_reads_parameters_by_name_whatever_their_order():
    model = _model()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 4, 1, 16, 16)).astype("float32"))
    named = net.expand_to_tasks(dict(model.named_parameters()), 2)
    assert list(named) == net.layer_names(4)
    listed = net.expand_to_tasks(model.parameters(), 2)
    assert isinstance(listed, list) and len(listed) == len(named)
    reference = net.task_logits(named, x).numpy()
    np.testing.assert_array_equal(net.task_logits(listed, x).numpy(), reference)
    shuffled = dict(reversed(list(named.items())))
    np.testing.assert_array_equal(net.task_logits(shuffled, x).numpy(), reference)


def test_a_parameter_list_of_the_wrong_length_is_an_error_naming_what_is_expected():
    params = list(_model().parameters())[:-1]
    with pytest.raises(ValueError, match="expected the network's 14 layer parameters .*fc_bias.*got 13 tensors"):
        net.by_name(params, blocks=4)


def test_the_maml_plus_plus_options_select_their_tensors_by_name():
    model = _model(**{"hyper_parameters.per_step_bn": True, "hyper_parameters.learn_inner_lr": True})
    convs = [f"conv{b}_weight" for b in range(4)]
    assert model.adapted_names == convs + ["fc_weight", "fc_bias"]
    assert model.per_stage_names == [name for b in range(4) for name in (f"bn{b}_weight", f"bn{b}_bias")]
    assert list(model.adapted_parameters()) == model.adapted_names
    rates = model.inner_rates(1, lr=0.5)
    assert list(rates) == model.adapted_names
    model.inner_lr.set_value(paddle.to_tensor(np.arange(12, dtype="float32").reshape(2, 6)))
    assert [float(rate) for rate in model.inner_rates(1, lr=0.5).values()] == [6, 7, 8, 9, 10, 11]
    fast = net.expand_to_tasks(model.adapted_parameters(), 2)
    inputs = model.layer_inputs(fast, stage=1)
    assert list(inputs) == net.layer_names(4)
    np.testing.assert_array_equal(inputs["bn2_bias"].numpy(), np.tile(model.bn2_bias.numpy()[1], 2))
    assert inputs["conv2_weight"] is fast["conv2_weight"]
    plain = _model()
    assert plain.per_stage_names == [] and plain.adapted_names == net.layer_names(4)
    assert plain.inner_rates(0, lr=0.5) == dict.fromkeys(net.layer_names(4), 0.5)
