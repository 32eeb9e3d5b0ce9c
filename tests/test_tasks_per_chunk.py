"""hyper_parameters.tasks_per_chunk: how many tasks one pass adapts and scores. It trades memory for speed and
must not change the meta-gradient (tasks are independent, so chunking only regroups a sum)."""
import numpy as np
import paddle
import pytest

from tests import maml_modules
from tests.maml_modules import float64

dygraph_model, net, maml, _ = maml_modules.load()

TASKS, WAYS = 5, 3
CONFIG = {"hyper_parameters.n_way": WAYS, "hyper_parameters.update_step": 2, "hyper_parameters.bn_channel": 4,
          "hyper_parameters.imgsize": 16, "hyper_parameters.base_optimizer.learning_rate": 0.3}


def _batch():
    rng = np.random.default_rng(7)
    return [rng.standard_normal((TASKS, WAYS, 1, 16, 16)), np.tile(np.arange(WAYS), (TASKS, 1)),
            rng.standard_normal((TASKS, 2 * WAYS, 1, 16, 16)), np.tile(np.arange(WAYS).repeat(2), (TASKS, 1))]


@pytest.fixture
def sizes_used(monkeypatch):
    """The tasks_per_chunk of every meta-gradient computed in the test, as maml receives it."""
    sizes = []
    chunks = maml.adapted_chunks

    def spy(model, meta_batch, tasks_per_chunk, *rest):
        sizes.append(tasks_per_chunk)
        return chunks(model, meta_batch, tasks_per_chunk, *rest)

    monkeypatch.setattr(maml, "adapted_chunks", spy)
    return sizes


@pytest.mark.parametrize("first_order", [False, True])
def test_every_chunk_size_gives_the_same_meta_gradient(sizes_used, first_order):
    results = {}
    with float64():
        for size in (1, 2, TASKS):
            config = dict(CONFIG, **{"hyper_parameters.first_order": first_order,
                                     "hyper_parameters.tasks_per_chunk": size})
            paddle.seed(0)
            model = dygraph_model.DygraphModel().create_model(config)
            loss, grads = dygraph_model.DygraphModel.meta_gradients(model, _batch(), config)
            results[size] = (float(loss), [g.numpy() for g in grads])
    assert sizes_used == [1, 2, TASKS]
    whole_loss, whole = results[TASKS]
    for size in (1, 2):
        loss, grads = results[size]
        assert loss == pytest.approx(whole_loss, rel=1e-12)
        for g, w in zip(grads, whole):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_the_default_is_maml_own_chunk_size(sizes_used):
    paddle.seed(0)
    model = dygraph_model.DygraphModel().create_model(CONFIG)
    dygraph_model.DygraphModel.meta_gradients(model, _batch(), CONFIG)
    assert sizes_used == [maml.TASKS_PER_CHUNK]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_a_bad_chunk_size_stops_the_model_at_creation(value):
    with pytest.raises(ValueError, match="hyper_parameters.tasks_per_chunk: must be a positive integer"):
        dygraph_model.DygraphModel().create_model(dict(CONFIG, **{"hyper_parameters.tasks_per_chunk": value}))
