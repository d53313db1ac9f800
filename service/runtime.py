"""Process-level settings shared by the entry points (offline commands and the service)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the kernel.

    Training allocates and frees the same few 100 MB activation buffers every step; by default
    glibc serves each with a fresh mmap, and the page faults on first touch cost more than the
    arithmetic (a CPU step measured 2.1 s before and 0.55 s after on this project's 2-core box).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):  # not glibc
        ok = 0
    if not ok:
        log.debug("mallopt not available; keeping the default allocator settings")


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Compute with subnormal floats as zero on the CPU (``torch.set_flush_denormal``) inside
    the block, for the calling thread; IEEE behaviour, torch's default, again after it (other
    code, e.g. a property-based test library, relies on subnormals).

    Training drives some values below float32's normal range, where x86 arithmetic is many
    times slower: ACF's epochs on ml100k went from 6 s to 22 s after epoch 18 and stayed there.
    With them flushed the same 30 epochs took 190 s against 351 s, with the same validation
    nDCG@20 (0.1390; ``README``, "How fast, and why")."""
    if not torch.set_flush_denormal(True):
        log.debug("this CPU cannot flush subnormal floats; keeping them")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (process-wide: for work done
    while nothing else runs, e.g. a start-up before requests are served), as before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bar_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 10.0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
