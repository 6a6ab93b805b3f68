"""Capture and restore every random-number state a training process draws from, for exact resume.

Sources: torch's CPU generator, one CUDA generator per visible device, Python's `random`, NumPy's
legacy global RNG (`np.random.*`, still used by many augmentation libraries) and, optionally, one
`np.random.Generator` owned by the caller (e.g. a data sampler).

The captured dict holds only tensors and plain Python values, so a checkpoint containing it loads with
`torch.load(..., weights_only=True)`, which refuses NumPy arrays:
- NumPy arrays become a tagged dict `{"__ndarray__": tensor, "dtype": str}`; unsigned arrays are stored
  bit-for-bit as the signed dtype of the same width because torch has no general uint32/uint64 support.
- PCG64's 128-bit state/increment stay Python ints: the weights_only unpickler accepts arbitrary-size
  ints (pickle's LONG1/LONG4 opcodes), which the tests check.

RNG states are per process: in DDP every rank has its own, so a checkpoint written by rank 0 alone
restores rank 0's streams exactly and gives the other ranks rank 0's streams too. Reseeding per rank
after restore (or gathering all ranks' states) is the caller's decision.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NDARRAY = "__ndarray__"
# Same-width signed dtypes torch can hold; the bits are reinterpreted, never converted.
_SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}


def _encode(value: Any) -> Any:
    """A NumPy bit-generator state with its arrays replaced by tagged tensors (recursively)."""
    if isinstance(value, np.ndarray):
        signed = _SIGNED.get(value.dtype, value.dtype)
        # copy(): from_numpy shares memory, and the caller may keep drawing from the generator.
        return {_NDARRAY: torch.from_numpy(value.view(signed).copy()), "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping):
        if _NDARRAY in value:
            return value[_NDARRAY].numpy().view(np.dtype(value["dtype"])).copy()
        return {k: _decode(v) for k, v in value.items()}
    return value


def _capture_numpy_global() -> dict[str, object]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    if name != "MT19937":  # the legacy global RandomState is always MT19937; guard the unpacking anyway
        raise RuntimeError(f"unexpected legacy NumPy bit generator {name!r}")
    # uint32 key words fit int64 exactly; a plain tensor keeps this entry readable in a debugger.
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _restore_numpy_global(state: Mapping[str, Any]) -> None:
    key = state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, int(state["pos"]), int(state["has_gauss"]), float(state["gauss"])))


def _capture_cuda() -> list[torch.Tensor]:
    # Querying an uninitialised CUDA runtime would initialise it (slow, and fatal in a forked
    # DataLoader worker); a process that never touched CUDA has no CUDA random state worth keeping.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint has CUDA RNG states for %d device(s) but CUDA is not available: skipped",
                    len(states))
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        log.warning("checkpoint has CUDA RNG states for %d device(s), %d visible now: restoring the first %d",
                    len(states), count, min(len(states), count))
    for device, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s, device)


def capture(generator: np.random.Generator | None = None) -> dict[str, object]:
    """All RNG states of this process (plus `generator`'s, if given), loadable with weights_only."""
    version, internal, gauss = random.getstate()
    state: dict[str, object] = {
        "version": FORMAT_VERSION,
        "torch": torch.get_rng_state(),
        "cuda": _capture_cuda(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": _capture_numpy_global(),
    }
    if generator is not None:
        state["generator"] = _encode(generator.bit_generator.state)
    return state


def restore(state: Mapping[str, Any], generator: np.random.Generator | None = None) -> None:
    """Inverse of `capture`. `generator` must be of the same bit-generator kind as the captured one."""
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported RNG state version {state.get('version')!r}, expected {FORMAT_VERSION}")
    # Check before touching anything, so a bad call leaves every stream as it was.
    if generator is not None:
        if "generator" not in state:
            raise ValueError("a generator was passed but the captured state has none")
        want, have = state["generator"].get("bit_generator"), type(generator.bit_generator).__name__
        if want != have:
            raise ValueError(f"captured generator is {want}, the one passed is {have}")
    torch.set_rng_state(state["torch"])
    _restore_cuda(list(state.get("cuda", [])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss"]))
    _restore_numpy_global(state["numpy"])
    if generator is not None:
        generator.bit_generator.state = _decode(state["generator"])
