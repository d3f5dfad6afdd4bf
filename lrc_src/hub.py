"""Hugging Face hub access: can it be used right now, is a dataset cached, and a switch to turn it off.

Teachers (hub model ids), the paper's streamed data mix, the SFT chat data and the hub benchmark
suites all ask :func:`hub_offline_reason` before they touch the hub, so that an offline machine
fails at once with one line naming what is missing instead of letting ``from_pretrained`` or
``load_dataset`` retry for a minute. The tiny suite runs inside :func:`hub_offline`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path

#: Environment switches that turn the hub off, in the order they are reported.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
DEFAULT_ENDPOINT = "https://huggingface.co"


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in _TRUE_VALUES


def hub_offline_reason(*, datasets: bool = False, timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or ``None`` when it looks reachable.

    Checks the offline switches first (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, and with
    ``datasets=True`` also ``HF_DATASETS_OFFLINE``, which only the ``datasets`` library obeys),
    then makes one quick HEAD request to the hub endpoint (``HF_ENDPOINT``, ``timeout`` seconds;
    the answer is cached for the process). Any HTTP answer, even an error status, means reachable.
    """
    for var in _OFFLINE_VARS:
        if var == "HF_DATASETS_OFFLINE" and not datasets:
            continue
        if _truthy(os.environ.get(var)):
            return f"{var}={os.environ[var]} is set"
    return _probe_endpoint(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT, float(timeout))


@cache
def _probe_endpoint(endpoint: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # the server answered: it is reachable
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"{endpoint} is unreachable ({getattr(err, 'reason', err)})"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg_cache).expanduser() / "huggingface"


def dataset_cached(repo_id: str) -> bool:
    """Whether hub dataset ``repo_id`` looks downloaded (hub cache or ``datasets`` cache).

    Reads the cache locations from the environment as the libraries do (``HF_HUB_CACHE``,
    ``HUGGINGFACE_HUB_CACHE``, ``HF_DATASETS_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``).
    """
    hub_cache = Path(
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub"
    ).expanduser()
    snapshots = hub_cache / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    built = datasets_cache / repo_id.replace("/", "___")
    return built.is_dir() and any(built.iterdir())


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Turn Hugging Face hub access off inside the block (env vars and loaded libraries).

    ``huggingface_hub`` and ``datasets`` read the offline switches at import time, so the
    already-imported module constants are set too; everything is restored on exit.
    """
    saved_env = {var: os.environ.get(var) for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patches = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ]
    saved_attrs = []
    for module_name, attr in patches:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved_attrs.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for module, attr, value in saved_attrs:
            setattr(module, attr, value)
