"""Where sweep points run: in this process, in local worker processes, or on a Ray cluster.

Every executor receives groups of points that share a quantized model, runs each group consecutively in
one worker (whose cache keeps that model) and yields each point's rows as soon as the point finishes, so
the driver can save them at once. Which worker ran a point never changes its numbers: the runner derives
every random draw from the point's own seed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from queue import Empty
from typing import Any

from photosim._imports import import_extra
from photosim.errors import PhotosimError

EXECUTORS = ("local", "ray")
RAY_CONNECT_TIMEOUT_S = 10.0  # ray.init waits forever for an address that does not answer
PARENT_POLL_S = 0.5  # how often a local worker checks that the sweep's process still runs
Runner = Callable[[dict[str, Any], dict[Any, Any]], list[dict[str, Any]]]
Group = list[tuple[int, dict[str, Any]]]  # (point index, runner input) pairs sharing a quantized model; the
# runner input holds a point's fields by name, its quant and hw as validated QuantSpec and HardwareConfig
Finished = tuple[int, list[dict[str, Any]], float]  # (point index, rows, wall seconds)
_worker: dict[str, Any] = {"cache": {}, "queue": None}  # per-process state of a local worker


def check_executor(executor: str, workers: int | None, address: str | None) -> None:
    """Refuse an unknown executor, a non-positive worker count, or options the executor ignores."""
    if executor not in EXECUTORS:
        raise PhotosimError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}.")
    if workers is not None and workers < 1:
        raise PhotosimError(f"--workers must be a positive integer, got {workers}.")
    if address is not None and executor != "ray":
        raise PhotosimError("--address names a Ray cluster and only applies with --executor ray.")
    if executor == "ray":
        _import_ray()
    if address is not None:
        check_ray_address(address)


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) Ray address without a valid port, or that does not accept a
    connection in time."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon:
        return  # "auto" and other forms: Ray resolves them and fails fast itself
    if not port.isdigit() or not 0 < int(port) < 65536 or not host.strip("[]"):
        raise PhotosimError(f"--address {address!r} is not HOST:PORT (a host name or IP address, then a port "
                            "1..65535, e.g. 127.0.0.1:6379); fix it, or leave --address out to start a local Ray.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PhotosimError(f"cannot reach a Ray cluster at --address {address} ({exc.strerror or exc}, waited at "
                            f"most {timeout:g} s); start it (ray start --head), fix the address, or leave --address "
                            "out to start a local Ray.") from None


def execute(groups: list[Group], runner: Runner, *, executor: str = "local", workers: int | None = None,
            address: str | None = None) -> Iterator[Finished]:
    """Run every point of ``groups`` with ``runner``; yield each as it finishes, in completion order.

    ``workers`` defaults to 1 locally (this process) and to every CPU of the cluster with Ray.
    """
    check_executor(executor, workers, address)
    if not groups:
        return
    if executor == "ray":
        yield from _on_ray(groups, runner, workers, address)
    elif (workers or 1) == 1:
        yield from _in_this_process(groups, runner)
    else:
        yield from _in_processes(groups, runner, workers or 1)


def run_timed(runner: Runner, index: int, point: dict[str, Any], cache: dict[Any, Any]) -> Finished:
    """One point through the runner, with its wall time."""
    start = time.perf_counter()
    rows = runner(point, cache)
    return index, rows, time.perf_counter() - start


def _in_this_process(groups: list[Group], runner: Runner) -> Iterator[Finished]:
    cache: dict[Any, Any] = {}
    for group in groups:
        for index, point in group:
            yield run_timed(runner, index, point, cache)


def _init_process(queue: Any, threads: int, gpus: list[str], workers: int, parent: int) -> None:
    """Worker start-up: exit with the sweep's process ``parent``, where to send finished points, a fair share of
    the CPU threads and of the memory of each GPU the points use (the workers share it: each may allocate
    1/workers of it, so none starves). Workers ignore SIGINT: Ctrl-C reaches the whole process group, and the
    sweep's process alone handles it (it stops the workers and says how to resume), so no worker prints a
    KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="photosim-parent-watch", daemon=True).start()
    _worker["queue"] = queue
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if gpus:
        import torch

        for gpu in gpus:
            torch.cuda.set_per_process_memory_fraction(1.0 / workers, torch.device(gpu))


def _exit_with_parent(parent: int) -> None:
    """End this worker within PARENT_POLL_S once ``parent`` is gone (killed, even by SIGKILL, which nothing can
    catch): its pid is then no longer this process's parent. Without this, workers of a killed sweep hold
    their memory forever under PID 1, and so does multiprocessing's resource tracker, which waits for them."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def gpus_used(groups: list[Group]) -> list[str]:
    """The CUDA devices the points of ``groups`` run on (their ``device`` entries), sorted."""
    return sorted({str(p["device"]) for group in groups for _, p in group
                   if str(p.get("device", "")).startswith("cuda")})


def _run_group(runner: Runner, group: Group) -> None:
    for index, point in group:
        _worker["queue"].put(run_timed(runner, index, point, _worker["cache"]))


def _in_processes(groups: list[Group], runner: Runner, workers: int) -> Iterator[Finished]:
    """A pool of spawned processes, one group per task; finished points stream back through a queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    workers = min(workers, len(groups))
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process,
                               initargs=(queue, threads, gpus_used(groups), workers, os.getpid()))
    try:
        futures = [pool.submit(_run_group, runner, group) for group in groups]
        for _ in range(sum(map(len, groups))):
            yield _next_result(queue, futures)
    except BaseException:  # Ctrl-C, a failed point, or the driver closing the stream: stop the running points
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers now: they ignore SIGINT, and a running point would otherwise finish (and its
    group go on) after the sweep stopped. Finished points are already saved by the driver."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _next_result(queue: Any, futures: list[Future]) -> Finished:
    """The next finished point; re-raises a worker's exception once everything it sent was consumed."""
    while True:
        try:
            return queue.get(timeout=0.2)
        except Empty:
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception() from None


def _import_ray() -> Any:
    return import_extra("ray", "ray", "--executor ray", "or use --executor local")


class _PointWorker:
    """A Ray actor running points one after another, keeping the runner's cache between them."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.cache = runner, {}

    def run(self, index: int, point: dict[str, Any]) -> Finished:
        return run_timed(self.runner, index, point, self.cache)


def _on_ray(groups: list[Group], runner: Runner, workers: int | None, address: str | None) -> Iterator[Finished]:
    """One actor per worker; an idle actor takes the next whole group (the Ray instance in use is reused)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        options = {"address": address} if address else {"num_cpus": max(workers or 1, os.cpu_count() or 1),
                                                         "include_dashboard": False}
        try:
            ray.init(**options)
        except ConnectionError as exc:
            raise PhotosimError(f"Ray did not start or connect ({exc}); check --address, or the local Ray "
                                "installation when there is none.") from None
    actors: list[Any] = []
    try:
        count = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), len(groups)))
        needs_gpus = bool(gpus_used(groups))
        gpus = ray.cluster_resources().get("GPU", 0) if needs_gpus else 0
        if needs_gpus and not gpus:
            raise PhotosimError("the sweep's points run on cuda but the Ray cluster has no GPU; set device: cpu "
                                "or start Ray workers on GPU machines.")
        # Actors of GPU points share the cluster's GPUs (Ray assigns each its device and memory share).
        actor_class = ray.remote(num_cpus=1, num_gpus=min(1.0, gpus / count))(_PointWorker)
        actors = [actor_class.remote(runner) for _ in range(count)]
        yield from _schedule_on_actors(ray, groups, actors)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _schedule_on_actors(ray: Any, groups: list[Group], actors: list[Any]) -> Iterator[Finished]:
    pending = deque(groups)
    owner: dict[Any, int] = {}  # object ref -> actor number
    left = [0] * len(actors)  # unfinished points of each actor's current group

    def feed(actor: int) -> None:
        if pending:
            group = pending.popleft()
            left[actor] = len(group)
            owner.update({actors[actor].run.remote(index, point): actor for index, point in group})

    for actor in range(len(actors)):
        feed(actor)
    while owner:
        (ref,), _ = ray.wait(list(owner), num_returns=1)
        actor = owner.pop(ref)
        left[actor] -= 1
        if not left[actor]:
            feed(actor)
        yield _ray_get(ray, ref)


def _ray_get(ray: Any, ref: Any) -> Finished:
    """The result of a Ray task; a PhotosimError raised in the runner comes back as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PhotosimError):
            raise exc.cause from None
        raise
