"""Where tasks run: local processes, a Slurm job array or submitit's local executor.

Every task is fn(*args, threads) returning an outcome dict (never raising); `execute`
yields outcomes as they finish. Local processes get cores // jobs torch threads each
(`threads_per_worker`, the one count of cores shared with the measure stage).
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mdlgrok.measure import threads_per_worker

EXECUTORS = ("local", "slurm", "submitit-local")
STACK_MODES = ("auto", "on", "off")
SUBMITIT_FOLDER = ".submitit"  # <root>/<name>/.submitit: submitit's pickles and job logs


@dataclass
class SlurmOptions:
    """Resources of each submitit job (one run per job): Slurm partition (None: the cluster's
    default), wall time in minutes (a job that reaches it is requeued and resumes from its
    checkpoint, up to 3 times) and cpus, which are also the run's torch threads."""

    partition: str | None = None
    time: int = 240
    cpus: int = 4

    def __post_init__(self):
        for name in ("time", "cpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                flag = "--slurm-time (minutes)" if name == "time" else "--slurm-cpus"
                raise ValueError(f"{flag} must be a positive integer, got {v!r}")


class ExecutorUnavailable(ValueError):
    """An executor that cannot run here (submitit not installed, no Slurm)."""


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ExecutorUnavailable(
            "the slurm and submitit-local executors need submitit: "
            "pip install 'mdlgrok[slurm]' (or pip install submitit)"
        ) from None
    return submitit


def check_executor(executor: str, jobs: int | None) -> None:
    """Bad executor settings fail before any work (ValueError, the command's status 2)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if executor != "local":
        import_submitit()
    if executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ExecutorUnavailable(
            "--executor slurm: no Slurm here (sbatch or srun not found); use --executor local or submitit-local"
        )


class Resumable:
    """fn(*args) as a submitit job that Slurm may requeue: on a timeout or preemption submitit
    calls checkpoint(), which submits the same call again; the run resumes from its last
    checkpoint (training) or measures again (measuring), losing only the epochs since the last checkpoint."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def resolve_device(device: str) -> str:
    """auto: cuda where torch sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU (torch.cuda.is_available() is False)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def use_stacks(stack: str, device: str) -> bool:
    """Whether to train runs as stacks: `auto` stacks on a GPU, where it pays (bench-stacked), not on CPU."""
    if stack not in STACK_MODES:
        raise ValueError(f"unknown stack mode {stack!r}; choose {', '.join(STACK_MODES)}")
    if stack == "off" and device != "cpu":
        raise ValueError(f"--stack off trains one run per process on CPU; --device {device} needs stacks")
    return stack == "on" or (stack == "auto" and device != "cpu")


def execute(
    fn,
    tasks: list[tuple[str, str, tuple]],
    jobs: int | None,
    threads: int | None,
    executor: str = "local",
    slurm: SlurmOptions | None = None,
    folder: Path | None = None,
    name: str = "mdlgrok",
):
    """Outcomes of fn(*args, threads) for tasks of (key, path, args), in the order they finish."""
    if not tasks:
        return
    if executor != "local":
        yield from execute_submitit(fn, tasks, jobs, threads, executor, slurm or SlurmOptions(), folder, name)
        return
    workers = min(jobs or 1, len(tasks))
    if workers == 1:
        for _, _, args in tasks:
            yield fn(*args, threads)
        return
    import multiprocessing

    threads = threads or threads_per_worker(workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(fn, *args, threads) for _, _, args in tasks]
        for fut in as_completed(futures):
            yield fut.result()
    finally:  # on an interrupt, queued runs never start; running ones stop with the pool
        pool.shutdown(wait=True, cancel_futures=True)


def execute_submitit(fn, tasks, jobs, threads, executor, slurm: SlurmOptions, folder: Path, name: str):
    """The tasks as submitit jobs: one Slurm array (at most `jobs` at once), or LocalExecutor
    subprocesses submitted as slots free up (at most `jobs`, default 1). A job that dies outside fn (killed,
    out of memory, not requeued after a timeout) is an "error" outcome with submitit's message."""
    submitit = import_submitit()
    logs = (folder / SUBMITIT_FOLDER).resolve()
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=logs, cluster="slurm")
        params = {"name": name, "timeout_min": slurm.time, "cpus_per_task": slurm.cpus}
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if jobs:
            params["slurm_array_parallelism"] = jobs
        ex.update_parameters(**params)
        threads, limit, poll = threads or slurm.cpus, len(tasks), 10.0
    else:
        ex = submitit.LocalExecutor(folder=logs)
        ex.update_parameters(timeout_min=slurm.time)
        limit = min(jobs or 1, len(tasks))
        threads, poll = threads or threads_per_worker(limit), 0.2
    task = Resumable(fn)
    pending, running = [(key, path, (*args, threads)) for key, path, args in tasks], {}
    try:
        if executor == "slurm":
            submitted = ex.map_array(task, *zip(*(args for _, _, args in pending)))
            running = {job: item for job, item in zip(submitted, pending)}
            pending = []
        while pending or running:
            while pending and len(running) < limit:
                item = pending.pop(0)
                running[ex.submit(task, *item[2])] = item
            finished = [job for job in running if job.done()]
            for job in finished:
                key, path, _ = running.pop(job)
                try:
                    yield job.result()
                except Exception as exc:  # the job, not fn, failed: fn never raises
                    text = str(exc)
                    yield {
                        "key": key,
                        "path": path,
                        "state": "error",
                        "threads": threads,
                        "seconds": 0.0,
                        "reason": f"submitit job {job.job_id}: {first_line(text) or type(exc).__name__}",
                        "traceback": f"{type(exc).__name__}: {text}\n(logs in {logs})",
                    }
            if not finished:
                time.sleep(poll)
    finally:  # on an interrupt (or an early close), jobs still queued or running are cancelled
        for job in running:
            try:
                job.cancel(check=False)
            except Exception:  # pragma: no cover - best effort
                pass


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
