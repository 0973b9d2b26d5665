"""Data-parallel trials: one trial trained on ``resources.workers`` Ray Train workers.

The Tune trial (a small driver) starts a Ray Train ``TorchTrainer`` whose workers each
run the same :func:`~harness.run.trial.execute_trial`: Ray sets up the process group (gloo
on the CPU, NCCL on GPUs), mmengine's Runner finds it, shards every batch across the
workers and synchronises the gradients (its DistributedDataParallel wrapper). Every
worker reports each evaluation (Ray Train's report is a barrier); Ray forwards the first
worker's to Tune, and with it, at the end, the trial's rows. In a run (not a search)
the workers also report progress ticks, all at the same step (see the trial's hook).

The process group's rendezvous store listens on the first worker's node address only
(Ray's own set-up lets torch listen on every interface): on a local instance that is
loopback, as every other Ray socket of the run.
"""
from __future__ import annotations

from typing import Any

from harness.store import storage
from harness.suite.spec import TrialSpec

#: on the first worker of a trial: (listening socket, TCPStore server) of its process group
_STORE: tuple[Any, Any] | None = None


def _serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On the first worker: the process group's rendezvous store, on a socket bound to this
    node's address only, not to every interface. Returns (address, port)."""
    import socket
    from datetime import timedelta

    import ray
    import torch.distributed as dist
    global _STORE
    addr = ray.util.get_node_ip_address()
    sock = socket.create_server((addr, 0), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
    port = sock.getsockname()[1]
    _STORE = (sock, dist.TCPStore(addr, port, world_size, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.fileno()))
    return addr, port


def _join_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")    # fail, not hang, on a lost peer
    timeout = timedelta(seconds=timeout_s)
    store = _STORE[1] if world_rank == 0 and _STORE else dist.TCPStore(addr, port, world_size, is_master=False,
                                                                  timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _torch_config(backend: str) -> Any:
    """Ray Train's TorchConfig with the process group set up by :func:`_serve_store` and
    :func:`_join_group` (the rest, shutdown included, is Ray's)."""
    import ray
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            n, timeout = len(worker_group), backend_config.timeout_s
            addr, port = worker_group.execute_single(0, _serve_store, world_size=n, timeout_s=timeout)
            worker_group.execute(_set_torch_distributed_env_vars)     # LOCAL_RANK, RANK, WORLD_SIZE, ...
            ray.get([worker_group.execute_single_async(i, _join_group, backend=backend, world_rank=i, world_size=n,
                                                       addr=addr, port=port, timeout_s=timeout)
                     for i in range(n)])

    class Config(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return Backend

    return Config(backend=backend)


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    from .trial import execute_trial
    from .session import LastPoint, _placement, _rows_message

    spec = TrialSpec.from_dict(config["trial"])
    ctx = ray.train.get_context()
    report = LastPoint(ray.train.report)
    search_id = config.get("search_id", "")
    rows, _ = execute_trial(spec, report=report, placement=_placement(), write=False,
                            resume=config.get("resume", True), search_id=search_id,
                            progress=None if search_id else ray.train.report,   # a search's results are its metric's
                            lock=False)                                   # (the Tune trial holds the teacher's lock)
    # the first worker's rows are the trial's; the others report too (a barrier)
    ray.train.report(report.rows_result(_rows_message(rows) if ctx.get_world_rank() == 0 else "",
                                        config.get("metric")))


def train_on_workers(spec: TrialSpec, resume: bool = True, search_id: str = "",
                     metric: str | None = None) -> list[dict[str, Any]]:
    """Train ``spec`` on its workers from inside a Tune trial; their reports reach Tune
    (evaluations, then the rows) through Ray's TuneReportCallback. Returns the rows the
    first worker reported. ``search_id``/``metric``: a search's trial (its rows marked,
    its last result carrying the searched metric)."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    gpu = float(res.get("gpu") or 0)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"trial": spec.to_dict(), "resume": resume, "search_id": search_id, "metric": metric},
        torch_config=_torch_config("nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=int(res["workers"]), use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": float(res["cpu"]), **({"GPU": gpu} if gpu else {})}),
        run_config=RunConfig(name=f"train-{spec.trial_id}",
                             storage_path=storage.join(storage.ray_path(spec.storage, spec.output_dir), "train"),
                             callbacks=[TuneReportCallback()]),
    )
    from .session import ROWS_KEY
    return json.loads((trainer.fit().metrics or {}).get(ROWS_KEY) or "[]")
