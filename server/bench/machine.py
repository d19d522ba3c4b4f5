"""Where and on what a benchmark ran: machine, load, versions, commit, date.

Timings on a shared machine are only meaningful beside the load they were taken under, so every
benchmark records a load snapshot (load average and the busiest other processes) at its start
and end.

The commit is the one of the guardkit checkout in the current directory (a benchmark run from
the repository root); an installed package has no commit to report, so it is left out (None).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def _version(package: str) -> str | None:
    for name in (package, f"{package}-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(where: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() if done.returncode == 0 else ""


def _is_guardkit_checkout(root: Path) -> bool:
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return False
    return any(line.replace(" ", "") == 'name="guardkit"' for line in text.splitlines())


def git_commit(where: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the guardkit checkout holding ``where`` (default: the current
    directory); both None outside one (an installed package, another project's repository)."""
    none: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        top = _git(Path.cwd() if where is None else where, "rev-parse", "--show-toplevel")
        if not top or not _is_guardkit_checkout(Path(top)):
            return none
        commit = _git(Path(top), "rev-parse", "HEAD")
        dirty = bool(_git(Path(top), "status", "--porcelain", "--untracked-files=no", "--", "server", "guardkit"))
    except (OSError, subprocess.SubprocessError):
        return none
    return {"commit": commit or None, "dirty": dirty if commit else None}


def top_processes(limit: int = 5, interval: float = 1.0) -> list[dict[str, Any]]:
    """The busiest processes over ``interval`` seconds (other CPU consumers)."""
    try:
        import psutil
    except ImportError:
        return []
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    rows = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 5.0:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            rows.append({"pid": p.pid, "cpu_percent": round(cpu, 1), "command": cmd[:120]})
    return sorted(rows, key=lambda r: -r["cpu_percent"])[:limit]


def load_snapshot(interval: float = 1.0) -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)],
        "top_processes": top_processes(interval=interval),
    }


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    gpus = gpu_names()
    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "gpus": gpus,
        "device": gpus[0] if gpus else f"CPU ({os.cpu_count()} cores)",
    }


def versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "vllm": _version("vllm"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "guardkit": _version("guardkit"),
        **{f"guardkit_{k}": v for k, v in git_commit().items()},
    }


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
