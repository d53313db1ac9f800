"""Training runs side by side: each run in its own worker process with a share of the CPU.

One run's steps are many small operations over a batch of a few hundred rows, which two
threads hardly speed up (an ACF epoch on ml100k: 8.6 s with two threads, 9.3 s with one), so
on a CPU the runs of an experiment go faster side by side, one thread each, than one after the
other with every thread (README, "How fast, and why"). A run's weights do not depend on where
it ran: the same seed gives the same model with the same number of threads.

``Runner.submit`` returns a future; with one job the run happens in this process right away, as
``fit`` would, with its progress bars. Workers are spawned, so they import the main module
again: a script of your own that trains with more than one job keeps its work under
``if __name__ == "__main__":`` (the ``visrec`` command does).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import torch
from tqdm.auto import tqdm

from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, fit
from service.offline.training.train import TrainResult
from service.runtime import keep_freed_memory

_CACHED = 2  # prepared datasets a worker keeps (an experiment's main data and one more)
_prepared: dict[Path, Prepared] = {}  # a worker's datasets, by the file they came from


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(device: torch.device) -> int:
    """Runs side by side: one per core on a CPU (at most 8: each holds its data and model), one
    on a GPU, which a single run already keeps busy."""
    return 1 if device.type != "cpu" else min(cpu_cores(), 8)


class Runner:
    """Trains ``(prepared, config)`` runs with ``fit``, ``jobs`` at a time (worker processes
    with ``cores // jobs`` threads each), or in this process when ``jobs`` is 1."""

    def __init__(self, device: torch.device, *, jobs: int = 1, progress: bool = True) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs}")
        self.device, self.jobs, self.progress = device, jobs, progress
        self._pool: ProcessPoolExecutor | None = None
        self._files: dict[int, tuple[Prepared, Path]] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._bar: tqdm | None = None

    @property
    def threads(self) -> int:
        """torch threads of each worker: the cores shared out (unused with one job)."""
        return max(1, cpu_cores() // self.jobs)

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close(cancel=error is not None)

    def submit(
        self, prepared: Prepared, config: TrainConfig, name: str = ""
    ) -> Future[TrainResult]:
        """A future of ``fit(prepared, config)``; its ``seconds`` are the run's own wall time.
        ``name`` (default the model's) labels the run in the progress bar."""
        if self.jobs == 1:
            done: Future[TrainResult] = Future()
            try:
                done.set_result(_timed_fit(prepared, config, self.device, self.progress))
            except Exception as error:  # raised where the result is read, as a worker's is
                done.set_exception(error)
            return done
        pool = self._start()
        raw = pool.submit(_fit_in_worker, self._file(prepared), config, str(self.device))
        result: Future[TrainResult] = Future()
        label = f"{name or config.model} seed {config.seed}"
        raw.add_done_callback(lambda f: self._finished(f, result, label))
        if self._bar is not None:
            self._bar.total += 1
        return result

    def close(self, *, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._files.clear()

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),  # no forked OpenMP state
                initializer=_start_worker,
                initargs=(self.threads,),
            )
            self._tmp = tempfile.TemporaryDirectory(prefix="visrec-runs-")
            self._bar = tqdm(
                total=0,
                desc=f"runs ({self.jobs} side by side)",
                unit="run",
                disable=not self.progress,
            )
        return self._pool

    def _file(self, prepared: Prepared) -> Path:
        """Where workers read ``prepared`` from: written once (the features travel once, not
        with every run)."""
        kept = self._files.get(id(prepared))
        if kept is not None:
            return kept[1]
        assert self._tmp is not None
        path = Path(self._tmp.name) / f"prepared-{len(self._files)}.pkl"
        with path.open("wb") as f:
            pickle.dump(prepared, f, protocol=pickle.HIGHEST_PROTOCOL)
        self._files[id(prepared)] = (prepared, path)  # held, so that its id stays its own
        return path

    def _finished(self, raw: Future[bytes], result: Future[TrainResult], label: str) -> None:
        try:
            fitted = torch.load(
                io.BytesIO(raw.result()), map_location=self.device, weights_only=False
            )
        except BaseException as error:  # the run's own error, raised where it is read
            result.set_exception(error)
            return
        result.set_result(fitted)
        if self._bar is not None:
            self._bar.update()
            self._bar.set_postfix_str(f"{label}: {fitted.seconds:.0f} s")


def _timed_fit(
    prepared: Prepared, config: TrainConfig, device: torch.device, progress: bool
) -> TrainResult:
    started = time.perf_counter()
    result = fit(prepared, config, device=device, progress=progress)
    return replace(result, seconds=time.perf_counter() - started)


def _start_worker(threads: int) -> None:
    keep_freed_memory()
    torch.set_num_threads(threads)


def _fit_in_worker(path: Path, config: TrainConfig, device: str) -> bytes:
    """A run in a worker, returned as torch.save's bytes (the model whole, with its buffers)."""
    prepared = _prepared.get(path)
    if prepared is None:
        while len(_prepared) >= _CACHED:
            _prepared.pop(next(iter(_prepared)))
        with path.open("rb") as f:
            prepared = _prepared[path] = pickle.load(f)
    result = _timed_fit(prepared, config, torch.device(device), progress=False)
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()
