"""Stopping a training run at its first non-finite number, before it is applied or saved.

A NaN or infinite loss or gradient (a learning rate far too high, broken data) poisons every parameter
the optimizer step touches, and the epoch's checkpoint would keep it. The trainer checks each batch's
loss and gradients before the optimizer step, and the parameters before every save, and stops with one
line naming the epoch, the batch and the config keys the plugin says are the likely cause (its
NON_FINITE_KEYS, read by tools.utils.plugin.non_finite_keys; the tools know no model's keys).

The normal path costs one host sync per batch: every gradient is folded into one scalar that is 0 when
all are finite and NaN otherwise; which parameter is at fault is looked up only after a failure.
"""
import math

from tools.utils.errors import UserError


class NonFiniteError(UserError):
    """Training produced a NaN or infinite value; printed as one `error:` line like any UserError."""


def _nan_probe(tensors):
    """A scalar that is 0.0 when every element of `tensors` is finite and NaN otherwise.

    t * 0 is 0 for a finite element and NaN for NaN or +-inf, so the sum is exact: unlike a norm or a
    plain sum, it cannot overflow into a false alarm for large finite values.
    """
    import paddle

    return float(paddle.add_n([(t * 0).sum().astype("float32") for t in tensors]))


def _all_finite(tensors) -> bool:
    return not tensors or math.isfinite(_nan_probe(tensors))


def likely_causes(config, keys) -> str:
    """'check <key> (<what it is>, now <value>) and ...' for the plugin's {key: description}."""
    if not keys:
        return "check the learning rate(s) and the data"
    return "check " + " and ".join(f"{key} ({what}, now {config.get(key)!r})" for key, what in keys.items())


class NumericGuard:
    """The checks of one training run; `causes` ends every error line (see likely_causes)."""

    # A loss this many times its first value in the run is worth one warning: still finite, but a run
    # that diverges (a meta learning rate of 1e6 gives ~1e13) should not go on without a word.
    GROWTH_WARNING = 1e4

    def __init__(self, causes, warn):
        self.causes, self.warn = causes, warn
        self.first_loss = None
        self.warned = False

    def check_batch(self, loss_value, model, epoch, batch_id):
        """Raise NonFiniteError unless this batch's loss and every gradient are finite.

        Call after backward() (and, data-parallel, after the gradient all-reduce, so every rank decides
        alike) and before optimizer.step(): the update that would spread the fault is never applied.
        """
        where = f"epoch {epoch}, batch {batch_id}"
        stopped = f"training stopped before this update, nothing of epoch {epoch} saved; {self.causes}"
        if not math.isfinite(loss_value):
            raise NonFiniteError(f"{where}: the loss is {loss_value}; {stopped}")
        named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        if not _all_finite([grad for _, grad in named]):
            bad = next((name for name, grad in named if not _all_finite([grad])), "?")
            raise NonFiniteError(f"{where}: the gradient of {bad} is not finite (loss {loss_value:.4g}); {stopped}")
        self._watch_growth(loss_value, where)

    def _watch_growth(self, loss_value, where):
        if self.first_loss is None:
            self.first_loss = abs(loss_value)
        elif not self.warned and abs(loss_value) > self.GROWTH_WARNING * max(self.first_loss, 1e-12):
            self.warned = True
            self.warn(f"{where}: the loss is {loss_value:.4g}, up from {self.first_loss:.4g} at the run's first "
                      f"batch: training may be diverging; {self.causes}")

    def check_parameters(self, model, epoch):
        """Raise NonFiniteError if any floating-point parameter or buffer is not finite (call before saving).

        The per-batch checks see the loss and gradients; an update from finite but huge gradients can still
        overflow a parameter in the epoch's last batch, which only this check before the save sees.
        """
        named = [(name, value) for name, value in model.state_dict().items()
                 if hasattr(value, "dtype") and "float" in str(value.dtype)]
        if _all_finite([value for _, value in named]):
            return
        bad = next((name for name, value in named if not _all_finite([value])), "?")
        raise NonFiniteError(f"epoch {epoch}: parameter {bad} is not finite after the epoch's updates; "
                             f"its checkpoint is not written; {self.causes}")
