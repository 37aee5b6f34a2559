"""A run describes itself: resolved config, command line and versions go into the run directory."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import Config, dump_config
from .whole_file import write_whole


def git_commit() -> str:
    """The commit of the nmtkit source tree, with '+dirty' for local changes, or '' outside git."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        if Path(top).resolve() != here.parents[1]:  # nmtkit installed inside another project's repository (its .venv)
            return ""
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    import datasets
    import sentencepiece

    return {
        "nmtkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "datasets": datasets.__version__,
        "sentencepiece": sentencepiece.__version__,
        "git": git_commit(),
    }


def _program() -> str:
    """The command's name as typed: `nmtkit`, a script's name, or `python -m nmtkit` (whose argv[0] is __main__.py)."""
    name = Path(sys.argv[0]).name
    return "python -m nmtkit" if name == "__main__.py" else name


def write_run_info(run_dir: str | Path, cfg: Config, argv: list[str] | None, runtime_reason: str) -> None:
    """config.yaml (resolved) and run.jsonl (command line, versions, device choice) in the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_whole(run_dir / "config.yaml", dump_config(cfg))  # a start stopped here leaves no half file
    info = {
        # argv given: the command's own arguments, as `nmtkit` takes them (scripts/train.py adds "train" itself)
        "command": [_program(), *sys.argv[1:]] if argv is None else ["nmtkit", *argv],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "runtime": runtime_reason,
        "versions": versions(),
    }
    with open(run_dir / "run.jsonl", "a", encoding="utf-8") as f:  # one line per start, resumes included
        f.write(json.dumps(info, ensure_ascii=False) + "\n")
