"""JSON-lines result records: one line per measured (shape, implementation), with the environment."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def environment_info() -> dict[str, Any]:
    """Device, library versions and git revision, attached to every record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except Exception:
        info["git"] = None
    return info


class ResultWriter:
    """Appends JSON lines to ``path`` (None: keep records in memory only)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> dict[str, Any]:
        full = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **environment_info(), **record}
        self.records.append(full)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(full) + "\n")
        return full
