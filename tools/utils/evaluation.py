"""Evaluating a model over the evaluation loader: shared by infer.py and the
trainer's validation, so both compute their figures the same way.

    loader = evaluation_loader(config, "infer", rank, world_size, seed)
    values, batches, samples = evaluate(model_obj, model, config, epoch, loader, parallel, batch_size)

Validation is an evaluation on runner.valid_data_dir: validation_config()
gives the config the reader and the plugin then see (runner.test_data_dir and
runner.infer_tasks replaced by the validation settings), and mode "valid"
builds its loader (tools/utils/data.py).
"""
from tools.utils.config import ConfigView
from tools.utils.console import format_infer_values, format_values, log, progress_bar, warn
from tools.utils.data import batches_then_none, count_samples, create_data_loader, expected_batches
from tools.utils.distributed import merged_results
from tools.utils.metric_values import scalar_dict


def validation_enabled(config) -> bool:
    return config.get("runner.valid_data_dir") not in (None, "")


def validation_config(config):
    """The config validation runs with: readers read runner.test_data_dir and
    runner.infer_tasks for evaluation, so these hold runner.valid_data_dir and
    (when set) runner.valid_tasks; errors about them name the validation keys."""
    replacements = {"runner.test_data_dir": config.get("runner.valid_data_dir")}
    aliases = {"runner.test_data_dir": "runner.valid_data_dir"}
    if config.get("runner.valid_tasks") is not None:
        replacements["runner.infer_tasks"] = config.get("runner.valid_tasks")
        aliases["runner.infer_tasks"] = "runner.valid_tasks"
    return ConfigView(config, replacements, aliases)


def evaluation_loader(config, mode, rank, world_size, seed):
    """A fresh loader of the evaluation data ("infer" or "valid"), built after seeding with `seed`.

    Every evaluation sees the same data (reader epoch 0) with the same random
    state, so the results of different checkpoints are comparable.
    """
    from tools.utils.runtime import seed_everything

    seed_everything(seed)
    return create_data_loader(config, mode, rank, world_size, epoch=0)


def format_results(values) -> str:
    """'acc 0.9712 ± 0.0040 (95% CI, 1000 tasks)', or 'no results'."""
    return format_infer_values(values) or "no results"


def evaluate(model_obj, model, config, epoch, loader, parallel, batch_size, name="infer", on_interval=None):
    """Run infer_forward over the loader; return (metric values, batches, samples).

    `name` ("infer" or "valid") labels the log lines, the progress bar and
    the data-parallel sync points. The tool does not call model.eval() or
    paddle.no_grad(): the plugin chooses (MAML adapts with gradients).

    on_interval(batch_id, values), when given, also gets every logged line's values (VisualDL).

    Data-parallel: the ranks go through their batches in step (a small
    all-reduce per batch says which ranks still have one), so a rank that
    finishes early waits for the others, and batches/samples count all ranks.
    """
    print_interval = config["runner.print_interval"]
    line_prefix = "" if name == "infer" else f"{name} "
    parallel.barrier(f"{name} epoch {epoch}: start")  # ranks may arrive far apart (loading, data building)
    metrics, names = model_obj.create_metrics()
    batches = samples = 0
    bar = progress_bar(expected_batches(loader), f"{name} epoch {epoch}")
    batch_iterator = batches_then_none(loader)
    batch_id = 0
    while True:
        batch = next(batch_iterator)
        own_samples, print_dict = 0, {}
        if batch is not None:
            metrics, print_dict = model_obj.infer_forward(model, metrics, batch, config)
            own_samples = count_samples(batch, batch_size)
        if parallel.enabled:
            active, batch_samples = parallel.active_ranks(batch is not None, own_samples,
                                                          f"{name} epoch {epoch}, batch {batch_id}")
            if not active:
                break
        elif batch is None:
            break
        else:
            batch_samples = own_samples
        batches += 1
        samples += batch_samples
        if batch_id % print_interval == 0:
            shown, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                                  f"{name} epoch {epoch}, batch {batch_id}: merging metrics",
                                                  scalar_dict(print_dict), own_samples)
            log(f"{line_prefix}epoch: {epoch}, batch_id: {batch_id}, {format_values({**shown, **metric_values})}")
            if on_interval is not None:
                on_interval(batch_id, {**shown, **metric_values})
        bar.update(1)
        batch_id += 1
    bar.close()
    if batches == 0:
        warn(f"{line_prefix}epoch {epoch}: the evaluation loader gave no batches")
        return {}, 0, 0
    _, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                      f"{name} epoch {epoch}: merging metrics")
    return metric_values, batches, samples
