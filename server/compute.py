"""One thread runs all of the server process's torch work.

torch's CPU kernels run on OpenMP, and every thread that enters a parallel region gets an OpenMP team of its
own. The gRPC server calls in from many handler threads (Train streams, the PushAdapter that closes a round
and evaluates, the main thread that exported the bundle), so without this the process grows one team per
thread and the teams fight over the cores. Measured on 2 cores (MiniLM top 4 blocks, batch 16 x 40): a step
took 85 ms when only one thread had ever run torch and 107-113 ms, on any thread, once a second thread had;
in benchmarks/split_throughput.py the server's step went from 79.1 to 71.7-73.1 ms. Funnelling the work
through one thread also gives the arrival-order serialization the trainer wants.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


def _start(num_threads: int) -> ThreadPoolExecutor:
    def init() -> None:
        global _thread
        import torch

        torch.set_num_threads(num_threads)  # OpenMP's thread count is per calling thread: carry it over
        _thread = threading.current_thread()

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-compute", initializer=init)


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the compute thread (directly when already on it); exceptions propagate."""
    global _executor
    if threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    with _lock:
        if _executor is None:
            import torch

            _executor = _start(torch.get_num_threads())
        ex = _executor
    return ex.submit(fn, *args, **kwargs).result()
