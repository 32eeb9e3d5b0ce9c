"""Data-parallel runs of the tools under `python -m paddle.distributed.launch`.

The launcher starts one process per rank and tells each its place through
the environment (PADDLE_TRAINER_ID, PADDLE_TRAINERS_NUM, ...). With
runner.use_fleet: True, setup_data_parallel() joins them into one process
group with paddle.distributed.init_parallel_env(): gloo between CPU
processes, NCCL between GPUs (Paddle's choice for the device). Then:

- every rank reads its own share of each batch (the reader's shard hook;
  the loader's batch size is runner.*_batch_size / world size);
- the ranks start from rank 0's parameters (Paddle's sync_params_buffers, as
  paddle.DataParallel);
- after loss.backward(), sync_gradients() replaces every parameter's .grad by
  the sample-weighted mean of the ranks' gradients (Paddle's fused gradient
  all-reduce, after a small all-reduce of the sample counts, the loss and
  which ranks still had a batch), so every rank applies the same update and
  one step on N ranks is one single-process step on the union of their samples;
- metrics are combined with the optional metric methods state() and
  merge_states(states) (merged_results), and rank 0 reports.

Gloo gives up on a collective after 30 s if a peer has not joined it (a
fixed limit in this Paddle build; NCCL's is PADDLE_PG_TIMEOUT, 30 min). Where
ranks can legitimately drift far apart (building the data, rank 0 writing a
checkpoint: the start of every epoch and evaluation) barrier() first
waits on the launcher's rendezvous store, up to runner.sync_timeout, and
names the ranks that did not arrive. Inside an epoch the ranks meet at every
batch and do the same work, so the per-batch collectives go straight to the
backend (a store round trip costs ~45 ms here, too much per batch).
A rank that dies makes the launcher stop the others; a rank that hangs is
caught by one of those timeouts. Either way every surviving rank fails with a
DistributedError (exit code 3) and the launcher exits non-zero.
"""
import hashlib
import os
import pickle
import socket
import time

from tools.utils.console import DistributedError, UserError, log, set_rank, warn

RANK_VARIABLE = "PADDLE_TRAINER_ID"
WORLD_SIZE_VARIABLE = "PADDLE_TRAINERS_NUM"
_STORE_PREFIX = "paddlerec_tools/sync"
LAUNCH_HINT = "python -m paddle.distributed.launch --nproc_per_node N tools/<tool>.py -m <config> -o runner.use_fleet=True"


def launched_world():
    """(rank, world_size) set by a distributed launcher, or None when no launcher started this process."""
    rank, size = os.environ.get(RANK_VARIABLE), os.environ.get(WORLD_SIZE_VARIABLE)
    if rank is None or size is None:
        return None
    try:
        rank, size = int(rank), int(size)
    except ValueError:
        raise UserError(f"environment: {RANK_VARIABLE}={rank!r}, {WORLD_SIZE_VARIABLE}={size!r}: "
                        "expected integers (set by paddle.distributed.launch)") from None
    if not 0 <= rank < size:
        raise UserError(f"environment: {RANK_VARIABLE}={rank} is not a rank of {WORLD_SIZE_VARIABLE}={size}")
    return rank, size


def _first_line(error) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class Ranks:
    """This process's place among the data-parallel ranks, and the collectives the tools use.

    Not paddle.DataParallel, which wraps a model: the tools keep the model as the plugin built it.

    With world_size 1 every method is a cheap local no-op, so the tools run
    the same code with and without a launcher.
    """

    def __init__(self, rank=0, world_size=1, timeout=1800.0, store=None):
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self._store = store
        self._sync_points = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self):
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    # ----- waiting and collectives -----
    def barrier(self, label):
        """Wait (up to runner.sync_timeout) until every rank gets here; fail naming the ranks that did not.

        Uses counters in the launcher's rendezvous store rather than the
        backend, whose own limit (gloo: 30 s) is too short for a rank that is
        still building its data or writing a checkpoint.
        """
        if not self.enabled:
            return
        self._sync_points += 1
        point, store = self._sync_points, self._store
        try:
            store.add(f"{_STORE_PREFIX}/rank{self.rank}", 1)
            arrived = store.add(f"{_STORE_PREFIX}/all", 1)
            deadline = time.monotonic() + self.timeout
            delay = 0.0002
            while arrived < point * self.world_size:
                if time.monotonic() > deadline:
                    missing = [rank for rank in range(self.world_size)
                               if store.add(f"{_STORE_PREFIX}/rank{rank}", 0) < point]
                    raise DistributedError(
                        f"{label}: waited {self.timeout:g} s (runner.sync_timeout) for rank(s) {missing}, which "
                        f"did not reach barrier {point}; they hang or are far slower than this rank")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.02)
                arrived = store.add(f"{_STORE_PREFIX}/all", 0)
        except (RuntimeError, ValueError, OSError) as error:  # the store lives in rank 0's process
            raise DistributedError(f"{label}: lost the launcher's rendezvous store ({_first_line(error)}); "
                                   "rank 0 has probably died (see its log in the launcher's --log_dir)") from None

    def _collective(self, label, operation):
        try:
            return operation()
        except (RuntimeError, ValueError, OSError) as error:  # gloo: RuntimeError; the store: ValueError
            raise DistributedError(f"{label}: collective failed ({_first_line(error)}); another rank has probably "
                                   "died (see workerlog.<rank> in the launcher's --log_dir)") from None

    def all_reduce_sum(self, tensor, label):
        """Sum `tensor` over the ranks, in place (no barrier: see the module docstring)."""
        if not self.enabled:
            return tensor
        import paddle.distributed as dist

        return self._collective(label, lambda: dist.all_reduce(tensor))

    def all_gather_object(self, value, label) -> list:
        """[value of rank 0, value of rank 1, ...] on every rank (value must be picklable)."""
        if not self.enabled:
            return [value]
        import paddle.distributed as dist

        gathered = []
        self._collective(label, lambda: dist.all_gather_object(gathered, value))
        return gathered

    def check_same(self, value, what):
        """Raise on every rank when the ranks' `value`s differ (`what` describes it). Starts with a barrier."""
        if not self.enabled:
            return value
        self.barrier(f"checking {what}")
        values = self.all_gather_object(value, f"checking {what}")
        if any(other != values[0] for other in values):
            listing = "; ".join(f"rank {rank}: {item}" for rank, item in enumerate(values))
            raise DistributedError(f"the ranks disagree on {what} ({listing})")
        return values[0]

    def broadcast_state(self, model, label):
        """Give every rank rank 0's parameters and buffers (they should already agree: same seed or checkpoint)."""
        if not self.enabled:
            return
        from paddle.distributed.parallel import sync_params_buffers  # what paddle.DataParallel does at start

        self.barrier(label)
        self._collective(label, lambda: sync_params_buffers(model, src_rank=0))

    # ----- one training step -----
    def sync_gradients(self, parameters, samples, loss, label):
        """Average the gradients over the ranks, weighted by their samples.

        `samples` is this rank's batch size (0 and loss None when it had no
        batch left). Returns (ranks that had a batch, total samples, sample-weighted
        mean loss). Each trainable parameter's .grad becomes
        sum_r(samples_r * grad_r) / sum_r(samples_r); a parameter without a
        gradient on this rank counts as zero there, and gets one if any rank
        had one (so the optimizers of all ranks update the same parameters).
        Two collectives: a small all-reduce of the counts (samples, loss, which
        ranks and which parameters have something), then Paddle's fused gradient
        all-reduce (the one fleet's data parallelism uses), each rank's gradients
        scaled by its share of the samples so that their sum is the weighted mean.
        """
        import numpy as np
        import paddle
        from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients_with_group

        params = [p for p in parameters if not p.stop_gradient]
        world = self.world_size
        counts = np.zeros(2 + world + len(params), dtype="float64")
        counts[0] = samples
        counts[1] = samples * float(loss) if loss is not None else 0.0
        counts[2 + self.rank] = 1.0 if loss is not None else 0.0
        counts[2 + world:] = [p.grad is not None for p in params]
        totals = paddle.to_tensor(counts)
        self.all_reduce_sum(totals, label)
        totals = totals.numpy()
        total_samples = float(totals[0])
        active = [rank for rank in range(world) if totals[2 + rank] > 0.5]
        if total_samples > 0:
            synced = [p for p, flag in zip(params, totals[2 + world:]) if flag > 0.5]
            with paddle.no_grad():
                for param in synced:
                    if param.grad is None:
                        param.grad = paddle.zeros(param.shape, dtype=param.dtype)
            self._collective(label, lambda: fused_allreduce_gradients_with_group(
                synced, None, scale=samples / total_samples))
        loss_mean = float(totals[1]) / total_samples if total_samples > 0 else float("nan")
        return active, int(round(total_samples)), loss_mean

    def active_ranks(self, active, samples, label):
        """(ranks that still have a batch, their total samples): keeps evaluation ranks in step."""
        if not self.enabled:
            return ([0] if active else []), samples
        import numpy as np
        import paddle

        flags = np.zeros(1 + self.world_size, dtype="float64")
        flags[0] = samples
        flags[1 + self.rank] = 1.0 if active else 0.0
        tensor = paddle.to_tensor(flags)
        self.all_reduce_sum(tensor, label)
        totals = tensor.numpy()
        return [rank for rank in range(self.world_size) if totals[1 + rank] > 0.5], int(round(totals[0]))


SINGLE_PROCESS = Ranks()


def _config_digest(config) -> str:
    """Digest of the settings every rank must share (config_abs_dir may differ between hosts)."""
    items = sorted((key, repr(value)) for key, value in config.items() if key != "config_abs_dir")
    return hashlib.sha256(pickle.dumps(items)).hexdigest()[:16]


def setup_data_parallel(config, device) -> Ranks:
    """Decide from runner.use_fleet and the launcher's environment; join the process group when data-parallel.

    - no launcher: single process; runner.use_fleet True is an error (it would silently train alone);
    - a launcher with one process: single process (a warning if runner.use_fleet is True: nothing to split);
    - a launcher with N > 1 processes: data-parallel; runner.use_fleet must be True (otherwise N
      independent runs would overwrite each other's checkpoints).
    Call after select_device() (the GPU of each rank) and before building the model.
    """
    use_fleet = config.require("runner.use_fleet", bool)
    world = launched_world()
    if world is None:
        if use_fleet:
            raise config.error("runner.use_fleet", "True, but no distributed launcher started this process; "
                               f"run: {LAUNCH_HINT} (or set runner.use_fleet: False)")
        return SINGLE_PROCESS
    rank, world_size = world
    if world_size == 1:
        if use_fleet:
            warn("runner.use_fleet is True but the launcher started a single process; training single-process")
        return SINGLE_PROCESS
    set_rank(rank, world_size)
    if not use_fleet:
        raise config.error("runner.use_fleet", f"False, but the launcher started {world_size} processes; each would "
                           "run alone and overwrite the others' files; add -o runner.use_fleet=True")
    timeout = config.require("runner.sync_timeout", int)
    if timeout < 1:
        raise config.error("runner.sync_timeout", f"must be at least 1 second, got {timeout}")
    if device == "cpu":
        # On a CUDA build Paddle would pick NCCL; CPU processes need gloo.
        os.environ["PADDLE_DISTRI_BACKEND"] = "gloo"
    import paddle.distributed as dist
    from paddle.base import core

    try:
        dist.init_parallel_env()
        store = core.create_or_get_global_tcp_store()
    except (RuntimeError, ValueError, AssertionError) as error:
        raise DistributedError(f"joining the process group failed: {_first_line(error)}") from None
    parallel = Ranks(rank, world_size, timeout, store)
    parallel.check_same(_config_digest(config), "the config (config file and -o overrides)")
    hosts = parallel.all_gather_object(socket.gethostname(), "listing the ranks")
    backend = "gloo" if device == "cpu" else "nccl"
    log(f"data-parallel: {world_size} ranks ({backend}) on {', '.join(sorted(set(hosts)))}")
    return parallel


_warned_unmergeable = set()


def merged_results(parallel, metrics, names, create_metrics, label, values=None, weight=0.0):
    """(values, metric results) over every rank; one collective, all ranks must call it together.

    `values` ({key: number}, e.g. the last batch's print_dict) become their
    mean over the ranks weighted by `weight` (the rank's samples); keys some
    rank lacks are dropped. A metric with state() and merge_states(states) is
    combined exactly: a fresh metric from `create_metrics()` gets
    merge_states([state of rank 0, state of rank 1, ...]). Any other metric
    reports rank 0's share, with a warning.
    """
    from tools.utils.metrics import metric_results

    values = dict(values or {})
    if not parallel.enabled:
        return values, metric_results(metrics, names)
    mergeable = [callable(getattr(m, "state", None)) and callable(getattr(m, "merge_states", None)) for m in metrics]
    states = [metric.state() if ok else None for metric, ok in zip(metrics, mergeable)]
    gathered = parallel.all_gather_object((float(weight), values, states), label)
    total = sum(rank_weight for rank_weight, _, _ in gathered)
    shared = [key for key in values if all(key in rank_values for _, rank_values, _ in gathered)]
    if total > 0:
        values = {key: sum(w * rank_values[key] for w, rank_values, _ in gathered) / total for key in shared}
    else:
        values = {key: values[key] for key in shared}
    fresh = create_metrics()[0] if any(mergeable) else None
    combined = []
    for index, (metric, name, ok) in enumerate(zip(metrics, names, mergeable)):
        if ok:
            fresh[index].merge_states([rank_states[index] for _, _, rank_states in gathered])
            combined.append(fresh[index])
            continue
        if parallel.is_main and name not in _warned_unmergeable:
            _warned_unmergeable.add(name)
            warn(f"metric {name!r} has no state()/merge_states(); reporting rank 0's share of the samples only")
        combined.append(metric)
    return values, metric_results(combined, names)
