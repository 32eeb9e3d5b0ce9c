"""Data-parallel runs under `python -m paddle.distributed.launch` (doc/distributed.md): fleet's collective group
(gloo between CPU processes, NCCL between GPUs), its parameter broadcast and fused gradient all-reduce, and a
barrier with runner.sync_timeout. A dead or hung rank ends every other rank with a DistributedError (exit 3)."""
import hashlib
import os
import pickle
import socket
import time

import numpy as np

from tools.utils.console import DistributedError, UserError, log, set_rank, signals_held, warn

LAUNCH_HINT = ("python -m paddle.distributed.launch --nproc_per_node N tools/<tool>.py -m <config> "
               "-o runner.use_fleet=True")
_STORE_PREFIX = "paddlerec_tools/sync"


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Ranks:
    """This process's place among the ranks and the collectives the tools use; with one rank every collective is a
    local no-op, so the tools run the same code with and without a launcher."""

    def __init__(self, rank=0, world_size=1, timeout=1800.0, store=None):
        self.rank, self.world_size, self.timeout, self._store, self._sync_points = rank, world_size, timeout, store, 0
        self.enabled, self.is_main, self._warned = world_size > 1, rank == 0, set()

    def barrier(self, label):
        """Wait up to runner.sync_timeout for every rank, or fail naming those missing. Ranks may drift far apart
        (data building, rank 0 saving), past gloo's fixed timeout: this polls counters in the launcher's store."""
        if not self.enabled:
            return
        self._sync_points += 1
        point, store = self._sync_points, self._store
        try:
            store.add(f"{_STORE_PREFIX}/rank{self.rank}", 1)
            arrived, deadline, delay = store.add(f"{_STORE_PREFIX}/all", 1), time.monotonic() + self.timeout, 0.0002
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
            with signals_held():  # a dead peer: the launcher's SIGTERM must not hide this rank's error line
                return operation()
        except (RuntimeError, ValueError, OSError) as error:  # gloo: RuntimeError; the store: ValueError
            raise DistributedError(f"{label}: collective failed ({_first_line(error)}); another rank has probably "
                                   "died (see workerlog.<rank> in the launcher's --log_dir)") from None

    def sum(self, numbers, label):
        """The element-wise sum of `numbers` over the ranks (float64); no barrier: a store round trip per batch."""
        totals = np.asarray(numbers, dtype="float64")
        if self.enabled:
            import paddle
            import paddle.distributed as dist

            tensor = paddle.to_tensor(totals)
            self._collective(label, lambda: dist.all_reduce(tensor))
            totals = tensor.numpy()
        return totals

    def all_gather_object(self, value, label) -> list:
        if not self.enabled:
            return [value]
        import paddle.distributed as dist

        gathered = []
        self._collective(label, lambda: dist.all_gather_object(gathered, value))
        return gathered

    def check_same(self, value, what):
        """Raise on every rank when the ranks' `value`s differ (`what` describes it)."""
        if self.enabled:
            self.barrier(f"checking {what}")
            values = self.all_gather_object(value, f"checking {what}")
            if any(other != values[0] for other in values):
                listing = "; ".join(f"rank {rank}: {item}" for rank, item in enumerate(values))
                raise DistributedError(f"the ranks disagree on {what} ({listing})")
        return value

    def broadcast_state(self, model, label):
        """Rank 0's parameters and buffers on every rank, as paddle.DataParallel does at start."""
        if self.enabled:
            from paddle.distributed.parallel import sync_params_buffers

            self.barrier(label)
            self._collective(label, lambda: sync_params_buffers(model, src_rank=0))

    def sync_gradients(self, parameters, samples, loss, label):
        """(ranks that had a batch, total samples, weighted mean loss), each .grad made the mean over the ranks
        weighted by their `samples` (a missing one counts as zero): one step on N ranks is one on all their samples."""
        import paddle

        if not self.enabled:
            return int(loss is not None), samples, float("nan") if loss is None else float(loss)
        params = [p for p in parameters if not p.stop_gradient]
        own_loss = 0.0 if loss is None else samples * float(loss)
        totals = self.sum([samples, own_loss, loss is not None] + [p.grad is not None for p in params], label)
        if totals[0] > 0:
            from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients_with_group

            synced = [p for p, flag in zip(params, totals[3:]) if flag > 0.5]
            with paddle.no_grad():
                for param in synced:
                    if param.grad is None:
                        param.grad = paddle.zeros(param.shape, dtype=param.dtype)
            self._collective(label, lambda: fused_allreduce_gradients_with_group(
                synced, None, scale=samples / totals[0]))
        return int(round(totals[2])), int(round(totals[0])), totals[1] / totals[0] if totals[0] > 0 else float("nan")

    def merged_results(self, metrics, names, create_metrics, label, values=None, weight=0.0):
        """(values, metric results) over all ranks: `values` ({key: number}) averaged with the ranks' `weight`s;
        metrics with state() and merge_states(states) merged exactly into fresh ones, any other rank 0's share."""
        from tools.utils.metrics import metric_results

        values = dict(values or {})
        if not self.enabled:
            return values, metric_results(metrics, names)
        mergeable = [callable(getattr(metric, "state", None)) and callable(getattr(metric, "merge_states", None))
                     for metric in metrics]
        states = [metric.state() if ok else None for metric, ok in zip(metrics, mergeable)]
        gathered = self.all_gather_object((float(weight), values, states), label)
        total = sum(rank_weight for rank_weight, _, _ in gathered)
        shared = [key for key in values if all(key in rank_values for _, rank_values, _ in gathered)]
        values = {key: sum(w * rank_values[key] for w, rank_values, _ in gathered) / total if total > 0
                  else values[key] for key in shared}
        fresh = create_metrics()[0] if any(mergeable) else None
        combined = []
        for index, (metric, name, ok) in enumerate(zip(metrics, names, mergeable)):
            if ok:
                fresh[index].merge_states([rank_states[index] for _, _, rank_states in gathered])
                combined.append(fresh[index])
                continue
            if self.is_main and name not in self._warned:
                self._warned.add(name)
                warn(f"metric {name!r} has no state()/merge_states(); reporting rank 0's share of the samples only")
            combined.append(metric)
        return values, metric_results(combined, names)


def launched_rank(config):
    """(rank, world size) from the launcher's environment (checked by environment.check_environment), (0, 1)
    without one, which must match runner.use_fleet: alone it would silently train alone, and N runs without it
    overwrite each other. Needs no Paddle, so every launched rank reaches a refusal within moments of the others."""
    rank, size = os.environ.get("PADDLE_TRAINER_ID"), os.environ.get("PADDLE_TRAINERS_NUM")
    if rank is None or size is None:
        if config["runner.use_fleet"]:
            raise config.error("runner.use_fleet", "True, but no distributed launcher started this process; "
                               f"run: {LAUNCH_HINT} (or set runner.use_fleet: False)")
        return 0, 1
    if int(size) > 1:
        set_rank(int(rank), int(size))
        if not config["runner.use_fleet"]:
            raise config.error("runner.use_fleet", f"False, but the launcher started {size} processes; each would "
                               "run alone and overwrite the others' files; add -o runner.use_fleet=True")
    return int(rank), int(size)


def single_process(tool, config):
    """For predict and benchmark, which run in one process: an error under a multi-process launcher, whose ranks
    would each run the whole job and write the same files; runner.use_fleet is ignored, with a note."""
    size = os.environ.get("PADDLE_TRAINERS_NUM", "1")
    if int(size) > 1:
        raise UserError(f"tools/{tool} runs in one process, but paddle.distributed.launch started {size}; "
                        "run it without the launcher")
    if config.get("runner.use_fleet"):
        warn(f"runner.use_fleet is True; tools/{tool} runs in one process and ignores it")


def setup_data_parallel(config, device) -> Ranks:
    """The ranks of this run joined in fleet's collective group (call after select_device())."""
    rank, world_size = launched_rank(config)
    if world_size == 1:
        if config["runner.use_fleet"]:
            warn("runner.use_fleet is True but the launcher started a single process; training single-process")
        return Ranks()
    backend = "gloo" if device == "cpu" else "nccl"
    if backend == "gloo":
        os.environ["PADDLE_DISTRI_BACKEND"] = backend  # on a CUDA build Paddle would pick NCCL
    import warnings

    from paddle.base import core
    from paddle.distributed import fleet

    # Fleet's data-parallel topology makes (empty) groups for the other parallelisms and warns about each.
    warnings.filterwarnings("ignore", message=r"Current global rank \d+ is not in group")
    try:
        fleet.init(is_collective=True)  # as PaddleRec's use_fleet: the collective process group
        store = core.create_or_get_global_tcp_store()
    except (RuntimeError, ValueError, AssertionError) as error:
        raise DistributedError(f"joining the process group failed: {_first_line(error)}") from None
    parallel = Ranks(rank, world_size, float(config["runner.sync_timeout"]), store)
    # Every rank must run the same settings (config_abs_dir may differ between hosts).
    items = sorted((key, repr(value)) for key, value in config.items() if key != "config_abs_dir")
    digest = hashlib.sha256(pickle.dumps(items)).hexdigest()[:16]
    parallel.check_same(digest, "the config (config file and -o overrides)")
    hosts = parallel.all_gather_object(socket.gethostname(), "listing the ranks")
    log(f"data-parallel: {world_size} ranks ({backend}) on {', '.join(sorted(set(hosts)))}")
    return parallel
