"""A head's model on disk without pickle: scikit-learn pipelines through skops.

`skops.io` stores an object as a zip of JSON and arrays and, on load, refuses every type the caller has
not trusted. We trust exactly the types that scikit-learn and numpy define, listed from the file itself
(`get_untrusted_types`): a file that names anything else (a function, a class from another package) is
refused with the names, so a tampered head cannot run code when it is loaded.
"""
from __future__ import annotations

from pathlib import Path

from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_path

MODEL_FILE = "head.skops"
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "builtins.")


def save(pipeline: object, out: Path) -> str:
    import skops.io as sio

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        sio.dump(pipeline, tmp)
    return MODEL_FILE


def load(path: Path) -> object:
    import skops.io as sio

    if not path.is_file():
        raise ConfigError(f"head: {path} is missing (write it with taxotrain-head)")
    try:
        types = sio.get_untrusted_types(file=path)
    except Exception as err:  # a truncated or foreign zip: say which file, not skops' internals
        raise ConfigError(f"head: {path} is not a skops model file ({err})") from None
    foreign = [t for t in types if not t.startswith(TRUSTED_PREFIXES)]
    if foreign:
        raise ConfigError(f"head: {path} names types outside scikit-learn and numpy, refused: {foreign}")
    return sio.load(path, trusted=types)
