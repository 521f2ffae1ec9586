"""The builtin engine's memory outside Python: what oneDNN keeps per input shape, and what glibc keeps after a burst.

oneDNN runs the CPU matmuls (`cpu_linear`'s packed layers, bf16 linear layers) and keeps a compiled primitive per
input shape in two LRU caches: its own primitive cache and ideep's computation cache, 1024 entries each unless the
environment says otherwise. A prefill's shape is rows x prompt tokens, so prompts of many lengths fill both: on the
tiny test model they came to hold ~450 MB, most of a server's growth from 768 to 1,481 MB RSS over 2,000 requests of
distinct prompts (`bench/server_memory.py`). A decode step uses about five entries per batch size (the fused q/k/v,
o, fused gate/up, down and the output head, whatever the number of layers), so `ONEDNN_CACHE_ENTRIES` keeps the
shapes of some fifty batch sizes while prompts come and go: that server then levelled off at 942 MB, decoding as fast.

glibc keeps what is freed in its heaps for reuse; activations of varying sizes leave free pages between live blocks
there that it does not give back on its own (60 to 200 MB on the tiny test models after 2,000 requests). The engine
hands them back to the OS with `release_free_heap` once it has been idle a moment.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, MutableMapping

# ~0.4 MB per entry (both caches together) for the tiny models' matmuls: ~100 MB at this bound
ONEDNN_CACHE_ENTRIES = 256
# oneDNN's primitive cache, and ideep's (PyTorch's oneDNN wrapper) computation cache
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(environ: MutableMapping[str, str] = os.environ) -> None:
    """Cap oneDNN's per-shape caches at `ONEDNN_CACHE_ENTRIES` where the environment does not size them itself.

    oneDNN reads these once, when its first primitive is made: call this before the model is loaded. A size the
    environment gives ideep's cache must be a positive whole number (ValueError): 0, or text (read as 0), ends the
    process with a segmentation fault at the first matmul, and a negative size leaves the cache unbounded. oneDNN's
    own cache takes 0 as "no cache"."""
    for name in ONEDNN_CACHE_VARIABLES:
        environ.setdefault(name, str(ONEDNN_CACHE_ENTRIES))
    ideep = environ["LRU_CACHE_CAPACITY"]
    if not (ideep.strip().isdecimal() and int(ideep) > 0):
        raise ValueError(f"LRU_CACHE_CAPACITY (the number of compiled matmuls PyTorch's oneDNN wrapper keeps) must be "
                         f"a positive whole number, not {ideep!r}; unset it for the server's default of "
                         f"{ONEDNN_CACHE_ENTRIES}")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to call
        return None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
