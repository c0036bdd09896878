"""Where a sweep's runs execute: local processes (default) or tasks on a Ray cluster.

A launcher takes the configurations of runs that are not finished and calls
``on_done(config, status, warnings)`` as each completes; the runs themselves are
:func:`unshortcut.sweep.store.execute`, so every launcher trains, resumes and skips
alike. Adding a launcher is one function here and one entry in ``LAUNCHERS``
(DomainBed's command_launchers registry is the idea).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from unshortcut.errors import UnshortcutError
from unshortcut.sweep.config import LauncherSettings
from unshortcut.sweep.store import Status, execute

Job = dict[str, Any]
"""A run's TrainConfig as JSON data."""
OnDone = Callable[[Job, Status, list[str]], None]
Launcher = Callable[[list[Job], LauncherSettings, OnDone], None]


def local(jobs: list[Job], settings: LauncherSettings, on_done: OnDone) -> None:
    """One worker: in this process, in order. Several: a pool of fresh (spawned) processes,
    so each run starts from a clean interpreter and torch's thread settings are its own."""
    if settings.workers == 1:
        for job in jobs:
            on_done(job, *execute(job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.workers, mp_context=context) as pool:
        futures = {pool.submit(execute, job): job for job in jobs}
        for future in as_completed(futures):
            on_done(futures[future], *future.result())


def ray(jobs: list[Job], settings: LauncherSettings, on_done: OnDone) -> None:
    """Ray tasks, ``settings.workers`` at a time, each reserving the run's CPU threads.

    ``settings.address`` joins an existing cluster (``ray start --head`` on one machine,
    ``ray start --address`` on the others); without it a local instance starts.
    """
    try:
        import ray as ray_lib
    except ImportError:
        raise UnshortcutError(
            "launcher ray: Ray is not installed (pip install 'unshortcut[ray]')"
        ) from None
    if not ray_lib.is_initialized():
        ray_lib.init(address=settings.address, include_dashboard=False, log_to_driver=False)
    pending: dict[Any, Job] = {}
    queue = list(jobs)
    while queue or pending:
        while queue and len(pending) < settings.workers:
            job = queue.pop(0)
            task = ray_lib.remote(num_cpus=job.get("num_threads") or 1)(execute)
            pending[task.remote(job)] = job
        done, _ = ray_lib.wait(list(pending), num_returns=1)
        for ref in done:
            on_done(pending.pop(ref), *ray_lib.get(ref))


LAUNCHERS: dict[str, Launcher] = {"local": local, "ray": ray}


def get_launcher(name: str) -> Launcher:
    if name not in LAUNCHERS:
        raise UnshortcutError(f"launcher: unknown {name!r} (known: {', '.join(LAUNCHERS)})")
    return LAUNCHERS[name]
