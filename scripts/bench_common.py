"""What every benchmark records beside its figures: the commit, the machine and the device;
and the JSON file written whole (the parent folder created)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent


def run_facts() -> dict:
    """The commit measured (short hash), the CPU and the first JAX device."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "commit": commit,
        "machine": platform.processor() or platform.machine(),
        "device": str(jax.devices()[0]),
    }


def write_json(path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)
