"""Per-task resources: parsing, validation, GPU detection.

Workers offer named amounts (``GPU=2,ssd=1``); tasks hold amounts while they
run (``resources={"GPU": 1}``). The scheduler never overcommits, and fails
at once a task that no connected worker could ever run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any


def normalize(resources: Mapping[str, Any] | None, what: str) -> list[tuple[str, float]]:
    """``{"GPU": 1}`` -> ``[("GPU", 1.0)]``, with clear errors for bad input."""
    if not resources:
        return []
    if not isinstance(resources, Mapping):
        raise TypeError(
            f"{what}: resources must be a dict like {{'GPU': 1}}, not {type(resources).__name__}"
        )
    out = []
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what}: resource names must be non-empty strings, not {name!r}")
        try:
            value = float(amount)
        except (TypeError, ValueError):
            raise TypeError(f"{what}: resource {name!r} needs a number, not {amount!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{what}: resource {name!r} must be a positive number, not {amount!r}")
        out.append((name, value))
    return sorted(out)


def parse(spec: str) -> dict[str, float]:
    """``"GPU=2,ssd=1"`` -> ``{"GPU": 2.0, "ssd": 1.0}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, amount = part.partition("=")
        if not sep:
            raise ValueError(f"resources: {part!r} is not NAME=AMOUNT (e.g. GPU=2,ssd=1)")
        out.update(normalize({name.strip(): amount.strip()}, "resources"))
    return out


def detect_gpus() -> list[str]:
    """This host's NVIDIA GPUs (as ``CUDA_VISIBLE_DEVICES`` entries): the
    devices already made visible to this process, or those ``nvidia-smi``
    lists. No GPU (or no driver) is an empty list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in (x.strip() for x in visible.split(",")) if d and d != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
