"""Toy model plugin (PaddleRec's DygraphModel contract) for the tools' tests."""
import paddle
import paddle.nn.functional as F

import net
import toy_metrics

# Plugin-owned keys with defaults; the tools merge the YAML over these, so
# `-o hyper_parameters.optimizer.decay_steps=10` works without a YAML entry.
CONFIG_DEFAULTS = {
    "hyper_parameters.hidden_size": 16,
    "hyper_parameters.num_classes": 3,
    "hyper_parameters.dropout": 0.1,
    "hyper_parameters.optimizer.class": "Adam",
    "hyper_parameters.optimizer.learning_rate": 0.05,
    "hyper_parameters.optimizer.decay_steps": 0,  # 0: constant learning rate
    "hyper_parameters.optimizer.decay_gamma": 0.5,
}

_OPTIMIZERS = {"Adam": paddle.optimizer.Adam, "SGD": paddle.optimizer.SGD}


class DygraphModel:
    def create_model(self, config):
        hidden_size = config.require("hyper_parameters.hidden_size", int)
        if hidden_size < 1:
            raise config.error("hyper_parameters.hidden_size", f"must be at least 1, got {hidden_size}")
        return net.BlobClassifier(hidden_size, config.require("hyper_parameters.num_classes", int),
                                  config.require("hyper_parameters.dropout", float))

    def create_optimizer(self, model, config):
        name = config.require("hyper_parameters.optimizer.class", str)
        if name not in _OPTIMIZERS:
            raise config.error("hyper_parameters.optimizer.class", f"expected one of {sorted(_OPTIMIZERS)}, got {name!r}")
        learning_rate = config.require("hyper_parameters.optimizer.learning_rate", float)
        decay_steps = config.require("hyper_parameters.optimizer.decay_steps", int)
        if decay_steps > 0:
            learning_rate = paddle.optimizer.lr.StepDecay(
                learning_rate, step_size=decay_steps,
                gamma=config.require("hyper_parameters.optimizer.decay_gamma", float))
        return _OPTIMIZERS[name](learning_rate=learning_rate, parameters=model.parameters())

    def create_metrics(self):
        return [toy_metrics.BlobAccuracy(), toy_metrics.MeanCrossEntropy()], ["acc", "xent"]

    def _forward(self, model, metrics, batch):
        points, labels = batch
        logits = model(points)
        loss = F.cross_entropy(logits, labels)
        metrics[0].update(logits, labels)
        metrics[1].update(loss, int(labels.shape[0]))
        return loss

    def train_forward(self, model, metrics, batch, config):
        loss = self._forward(model, metrics, batch)
        return loss, metrics, {"loss": loss}

    def infer_forward(self, model, metrics, batch, config):
        # The tools leave the mode to the plugin; this model evaluates
        # without dropout and without building a gradient graph.
        model.eval()
        with paddle.no_grad():
            self._forward(model, metrics, batch)
        return metrics, {}
