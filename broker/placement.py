"""Where the parts run: N FFT workers or N shard writers as local processes or Ray actors.

``framebroker workers --count N`` starts N FFT workers as spawned processes here;
``--ray [ADDRESS]`` starts them as Ray actors instead (``pip install 'framebroker[ray]'``),
on the cluster at ADDRESS (``auto``: the running one) or, without ADDRESS, on a local
Ray instance started for this command (loopback, no dashboard). ``record --shards N
--ray`` does the same with the shard writers.

**Frames never travel through Ray.** Ray only starts the processes and hands each its
configuration; every actor connects to the broker by its control endpoint and takes
frames from framebroker's ZeroMQ work channel like any worker (Ray tasks cost about a
millisecond each, and ``ray.put`` copies).

**Restarts.** Each actor is one process with ``max_restarts`` (``--restarts``, default 3)
and unlimited task retries: when its process dies, Ray starts a new one and runs the
part again, which re-joins the broker's group under a new name; the broker declares the
old member dead after ``--worker-timeout`` and dispatches its frames again (the sink
removes duplicates), so every frame is still processed exactly once at the sink. The
new process imports the FFTW wisdom the first one saved (``--wisdom``, default the user
cache dir), so it does not pay MEASURE planning again. A restarted shard writer cannot
append to the file its predecessor left mid-run, so it writes the shard's next file
(``OUT_shardK_r1.h5``, ...) with the frames the broker dispatches to it from then on;
the master maps every file of the shard, and the frames the dead writer had taken but
not flushed are reported as a gap (see broker/vds.py). Processes started here (without
``--ray``) are not restarted.

**Stopping.** ``framebroker stop`` ends the stream: every actor returns at end-of-stream
and the command prints their summaries. Ctrl-C (or SIGTERM) ends the actors at once:
they belong to this command's Ray job, which ``ray.shutdown()`` ends.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import time
from typing import Any, Callable

from . import protocol as proto
from .signals import StopSignals, drain_wakeup, wakeup_fd

STOP_GRACE_S = 10.0  # after a stop signal: how long a child may take to finish

RAY_HINT = "pip install 'framebroker[ray]'"


class PlacementError(RuntimeError):
    """Ray is missing or cannot place the actors; the message says what to do."""


def require_ray() -> Any:
    """The ``ray`` module, or PlacementError with the install hint."""
    try:
        import ray
    except ImportError:
        raise PlacementError(f"--ray needs Ray, which is not installed here: {RAY_HINT}"
                             ) from None
    return ray


def connect(address: str | None, cpus: int) -> Any:
    """Join the Ray cluster at ``address``, or start a local one (``address`` None):
    always a new one, for this command alone (``address="local"``; without it Ray joins
    the cluster a ``ray start`` left on this host, or RAY_ADDRESS's, and refuses
    ``num_cpus`` for it)."""
    ray = require_ray()
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PlacementError(f"cannot start Ray{f' at {address}' if address else ''}: "
                             f"{exc}") from None
    return ray


# --- what runs in each process ------------------------------------------------------------

def run_part(kind: str, cfg: Any, shard: proto.Shard | None = None,
             restarted: bool = False) -> dict[str, Any]:
    """One part, start to end-of-stream: an FFT worker or a shard writer. The same code
    runs in a spawned process and in a Ray actor (``restarted``: Ray restarted it)."""
    if kind == "worker":
        from .workers import Worker

        worker = Worker(cfg)
        try:
            summary = worker.run()
        finally:
            worker.close()
    else:
        from .shards import record_shard

        summary = record_shard(cfg, shard, master=False, restarted=restarted)
    return {**summary, "pid": os.getpid()}


def _actor_class(ray: Any) -> Any:
    @ray.remote
    class Part:
        """One framebroker part in one Ray worker process."""

        def run(self, kind: str, cfg: Any, shard: proto.Shard | None) -> dict[str, Any]:
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
            return run_part(kind, cfg, shard, restarted)

    return Part


def start_on_ray(kind: str, configs: list[tuple[Any, proto.Shard | None]], address: str | None,
                 restarts: int, log: Callable[[str], None]) -> list[dict[str, Any] | str]:
    """Run one actor per config until each returns; an actor that failed for good gives
    its error text in its place. Ctrl-C/SIGTERM end every actor."""
    ray = connect(address, max(len(configs), os.cpu_count() or 1))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        part = _actor_class(ray)
        cpus = 1 if kind == "worker" else 0  # writers wait on the disk and the network
        actors = [part.options(max_restarts=restarts, max_task_retries=-1 if restarts else 0,
                               num_cpus=cpus).remote() for _ in configs]
        refs = [a.run.remote(kind, cfg, shard) for a, (cfg, shard) in zip(actors, configs)]
        log(f"started {len(actors)} {kind} actor(s) on Ray "
            f"({address or 'a local instance'}), max_restarts {restarts}")
        results: list[dict[str, Any] | str] = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as exc:  # RayActorError, RayTaskError: this part failed
                results.append(" ".join(str(exc).split())[:500])
        return results
    finally:
        ray.shutdown()


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def start_local(kind: str, configs: list[tuple[Any, proto.Shard | None]],
                log: Callable[[str], None]) -> list[dict[str, Any] | str]:
    """Run one spawned process per config until each returns (its summary, or the text
    of why it failed). A stop signal goes to every child at once, so each finishes
    what it holds (a writer closes its file) and still reports; a child that has not
    ended STOP_GRACE_S later is terminated. Nothing here waits on a timeout: the parent
    waits on the children's pipes and the stop signals' wakeup socket together."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in configs]
    procs = [ctx.Process(target=_child, args=(kind, cfg, shard, send), name=f"fb-{kind}{i}")
             for i, ((cfg, shard), (_, send)) in enumerate(zip(configs, pipes))]
    stop = StopSignals()
    stop.install()
    try:
        for i, (p, (_, send)) in enumerate(zip(procs, pipes)):
            p.start()
            send.close()  # the child's end: EOF here once the child is gone
            log(f"{kind} {i} pid {p.pid}")
        got = _collect(procs, [recv for recv, _ in pipes], stop)
    finally:
        stop.restore()
    for p in procs:
        p.join()
    return [got[i] for i in range(len(procs))]


def _collect(procs: list[Any], readers: list[Any], stop: StopSignals) -> dict[int, Any]:
    """Each child's one message (or why there is none), as they come."""
    got: dict[int, dict[str, Any] | str] = {}
    deadline = None
    while len(got) < len(procs):
        if stop.signum and deadline is None:
            deadline = time.monotonic() + STOP_GRACE_S
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, stop.signum)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = mp_connection.wait([r for i, r in enumerate(readers) if i not in got]
                                   + [wakeup_fd()], timeout=left)
        drain_wakeup()
        for i, r in enumerate(readers):
            if r in ready:
                try:
                    got[i] = r.recv()
                except EOFError:
                    procs[i].join()
                    got[i] = f"exited with {procs[i].exitcode}"
        if not ready and deadline is not None:  # the grace is over: end the stragglers
            for i, p in enumerate(procs):
                if i not in got:
                    p.terminate()
                    p.join()
                    got[i] = f"did not stop within {STOP_GRACE_S:g} s of {stop.name}"
    return got


def _child(kind: str, cfg: Any, shard: proto.Shard | None, results: Any) -> None:
    try:
        results.send(run_part(kind, cfg, shard))
    except Exception as exc:  # reported by the parent as this part's failure
        results.send(f"{type(exc).__name__}: {exc}")


def run_workers(cfg: Any, count: int, ray: str | None, restarts: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    """``framebroker workers``: ``count`` FFT workers here or on Ray; one summary."""
    configs = [(_nth_worker(cfg, k), None) for k in range(count)]
    results = (start_local("worker", configs, log) if ray is None else
               start_on_ray("worker", configs, None if ray == "local" else ray, restarts, log))
    for r in results:
        if isinstance(r, str):
            log(f"worker failed: {r}")
    ok = [r for r in results if isinstance(r, dict)]
    return {"workers": results, "frames": sum(r["frames"] for r in ok),
            "failed": len(results) - len(ok), "ended": bool(ok) and len(ok) == len(results)
            and all(r["ended"] for r in ok), "stopped_by": _stopped_by(ok),
            "placement": "local" if ray is None else "ray"}


def _stopped_by(summaries: list[dict[str, Any]]) -> str | None:
    """The stop signal that ended the parts, if one did (they all get the same)."""
    return next((r["stopped_by"] for r in summaries if r.get("stopped_by")), None)


def _nth_worker(cfg: Any, k: int) -> Any:
    """Worker ``k``'s config: with ``--metrics HOST:PORT`` it serves on PORT+k (port 0:
    each picks its own), so every worker has its own endpoint."""
    if cfg.metrics is None or not cfg.metrics[1]:
        return cfg
    host, port = cfg.metrics
    return dataclasses.replace(cfg, metrics=(host, port + k))


def record_on_ray(cfg: Any, count: int, block: int, address: str, restarts: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """``record --shards N --ray``: the shard writers as Ray actors; a restarted one
    writes its shard's next file (see broker/vds.py)."""
    from .shards import combine, open_master
    from .vds import finalise

    open_master(cfg, count, block)
    shards = [proto.Shard(k, count, block) for k in range(count)]
    try:
        results = start_on_ray("shard", [(cfg, s) for s in shards],
                               None if address == "local" else address, restarts, log)
    except KeyboardInterrupt:
        finalise(cfg.path)  # the master says what the writers had flushed
        raise
    return combine(cfg, shards, results, log)


class Workers:
    """What ``framebroker workers`` runs (``run()`` returns the summary)."""

    def __init__(self, cfg: Any, count: int, ray: str | None, restarts: int) -> None:
        if ray is not None:
            require_ray()  # fail now, in one line, before anything starts
        self.cfg, self.count, self.ray, self.restarts = cfg, count, ray, restarts

    def run(self) -> dict[str, Any]:
        return run_workers(self.cfg, self.count, self.ray, self.restarts, log_line)

    def close(self) -> None:
        """Nothing to release: every worker closes its own sockets."""


def summary_line(s: dict[str, Any]) -> str:
    per = ", ".join(f"{r['frames']} (pid {r['pid']})" if isinstance(r, dict) else "failed"
                    for r in s["workers"])
    return (f"framebroker workers: {len(s['workers'])} on {s['placement']}, {s['frames']} "
            f"frames: {per}")


def log_line(message: str) -> None:
    print(f"framebroker workers: {message}", file=sys.stderr, flush=True)
