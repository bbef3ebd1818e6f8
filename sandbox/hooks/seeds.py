"""Seeds the runner controls, train.py unchanged: root-owned in every trainer image, installed
by sitecustomize at interpreter start.

With AUTORESEARCH_SEED=k (k != 0), every seed train.py sets is offset by k: torch.manual_seed
(and torch.random.manual_seed), torch.cuda.manual_seed(_all), random.seed and
numpy.random.seed; and the default generators are seeded with k when torch, numpy and random
are first imported, so a train.py that sets no seed is seeded too. k = 0 (or unset) changes
nothing: a plain run is exactly what train.py asked for. Generators train.py makes and seeds
itself (torch.Generator().manual_seed) are its own business.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

SEED_ENV = "AUTORESEARCH_SEED"

_inside = threading.local()  # torch.manual_seed calls torch.cuda.manual_seed_all: offset once


def offset() -> int:
    try:
        return int(os.environ.get(SEED_ENV, "0") or 0)
    except ValueError:
        return 0


def _offset_seed(original, k: int):
    @functools.wraps(original)
    def seeded(seed, *args, **kwargs):
        if getattr(_inside, "active", False) or isinstance(seed, bool) or not isinstance(seed, int):
            return original(seed, *args, **kwargs)
        _inside.active = True
        try:
            # Generators take seeds in [0, 2**64): wrap around rather than fail.
            return original((seed + k) % 2**64 if seed >= 0 else seed + k, *args, **kwargs)
        finally:
            _inside.active = False

    seeded.__autoresearch_seed__ = k
    return seeded


def _patch(module, names, k: int) -> None:
    for name in names:
        original = getattr(module, name, None)
        if callable(original) and not hasattr(original, "__autoresearch_seed__"):
            setattr(module, name, _offset_seed(original, k))


def _patch_torch(torch, k: int) -> None:
    _patch(torch, ("manual_seed",), k)
    _patch(torch.random, ("manual_seed",), k)
    _patch(torch.cuda, ("manual_seed", "manual_seed_all"), k)
    torch.manual_seed(0)  # the default generators, for a train.py that seeds nothing: k


def _patch_numpy_random(np_random, k: int) -> None:
    _patch(np_random, ("seed",), k)
    np_random.seed(0)


def _patch_random(random, k: int) -> None:
    _patch(random, ("seed",), k)
    random.seed(0)


_PATCHES = {"torch": _patch_torch, "numpy.random": _patch_numpy_random, "random": _patch_random}


def install() -> None:
    """Offset seeds in this process (a no-op when the offset is 0)."""
    import after_import  # next to this file, root-owned

    k = offset()
    if k == 0:
        return
    for name, patch in _PATCHES.items():  # already imported (random, by site): patch it now
        if name in sys.modules:
            patch(sys.modules[name], k)
    after_import.install({name: functools.partial(patch, k=k) for name, patch in _PATCHES.items()})
