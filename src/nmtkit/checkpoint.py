"""Checkpoint files: atomic saves, keep-N rotation, and safe loading.

A checkpoint is one `torch.save` dict of tensors and plain Python values, loaded with
`weights_only=True`, so a file made by someone else can't run code on load. It carries the config
and the tokenizer models, so it is enough on its own to translate.

Layout in a run directory:
    checkpoints/step-000500.pt ...   the last `keep` saves
    checkpoints/last.pt               hard link to the newest save
    checkpoints/best.pt               hard link to the save with the lowest validation loss
Hard links cost no second write (a copy of a BASE checkpoint, 720 MB, takes 0.5 s with its fsync); the files are
read-only, so that writing into one name cannot change the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import secrets
import shlex
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
# Config sections that the weights depend on: a resume or an average requires them to match, but for these keys,
# which the weights do not depend on: a cap that only steers how the tokenizer is trained (a resumed run reuses the
# run directory's tokenizer and checks its fingerprint), the validation and test splits (the validation split only
# chooses best.pt), the Arrow cache's folder, the length of the sinusoidal position table (computed, never saved),
# and the dropout rates (regularisation of the steps to come).
WEIGHT_SECTIONS = ("data", "tokenizer", "model")
_MAY_DIFFER = {
    ("tokenizer", "max_sentences"), ("data", "valid"), ("data", "test"), ("data", "cache_dir"), ("model", "max_positions"),
    ("model", "dropout"), ("model", "attention_dropout"), ("model", "activation_dropout"),
}
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint can't be found, read, trusted, or used with this config."""


def config_differences(old: dict[str, Any], new: dict[str, Any], names: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """The keys of the weight sections where two config trees (`Config.to_dict()`, or a checkpoint's "config") differ,
    as 'section.key: <names[0]> old, <names[1]> new'; keys the weights do not depend on are left out."""
    diffs = []
    # a fine-tuned run's tokenizer is its init_from checkpoint's: its config's tokenizer section made nothing
    fine_tuned = bool(old.get("train", {}).get("init_from"))
    for section in WEIGHT_SECTIONS:
        if section == "tokenizer" and fine_tuned:
            continue
        for key, value in new.get(section, {}).items():
            if (section, key) in _MAY_DIFFER:
                continue
            before = old.get(section, {}).get(key)
            if section == "data" and key == "train" and same_path(before, value):
                continue
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(before, tuple):
                before = list(before)
            if before != value:
                diffs.append(f"{section}.{key}: {names[0]} {before!r}, {names[1]} {value!r}")
    return diffs


def same_path(old: Any, new: Any) -> bool:
    """Whether two settings name one file: equal, or spelled another way (relative against absolute, `./data/x`
    against `data/x`, through a link). Relative paths are taken from the working directory."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and os.path.realpath(old) == os.path.realpath(new)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # mode 666 under the process's umask, as a plain open() gives (mkstemp's 0600 locked out the run's other users)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            _read_only(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous checkpoint is untouched") from e
        raise
    _fsync_dir(path.parent)


def _read_only(fd: int) -> None:
    """Drop the write bits of a checkpoint file. last.pt, best.pt and the newest step file are one file under three
    names: `cp step-000500.pt last.pt` or `torch.save(..., "last.pt")` would write into all three, best.pt included,
    and a read-only file makes them fail instead (for users other than root). nmtkit itself never writes into a
    checkpoint file: it renames new ones into place."""
    with contextlib.suppress(OSError):  # a file system without modes (some network mounts): the save still counts
        os.fchmod(fd, os.fstat(fd).st_mode & ~0o222)


def _link_atomic(target: Path, link: Path) -> None:
    """Point `link` at `target` (a hard link, so no second copy is written), replacing it atomically."""
    tmp = link.with_name(f".{link.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(target, tmp)
        except OSError:  # file systems without hard links get a copy, on disk before its name
            shutil.copyfile(target, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
                _read_only(f.fileno())
        os.replace(tmp, link)
    except OSError as e:  # a full disk while copying: the old link stays, the half copy goes
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not point {link} at {target.name}: {e}; {link} is as it was before this save") from e


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], step: int, *, is_best: bool, keep: int) -> Path:
    """Save `state` as step-N.pt, update last.pt (and best.pt), and delete saves beyond the newest `keep`."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # left by a save that was killed half-way
        stale.unlink(missing_ok=True)
    state = {"format_version": FORMAT_VERSION, **state, "model_sha256": weights_digest(state["model"])}
    path = directory / f"step-{step:06d}.pt"
    write_atomic(state, path)
    _link_atomic(path, directory / "last.pt")
    if is_best:
        _link_atomic(path, directory / "best.pt")
    _rotate(directory, keep)
    _fsync_dir(directory)
    return path


def _rotate(directory: Path, keep: int) -> None:
    """Delete old step files. last.pt and best.pt are separate links, so they survive."""
    for _, old in step_files(directory)[:-keep]:
        old.unlink(missing_ok=True)


def set_aside_later_saves(run_dir: str | Path, step: int) -> Path | None:
    """Move the step files numbered after `step` (a run resumed from an earlier save: `last.pt` pointed back at it)
    into `checkpoints/after-step-N/`, and return that folder, or None where there are none. They belong to the
    abandoned stretch of training: left in place, keep-N rotation would delete each new save before them (the
    newest by number), and `nmtkit average` would mix the two stretches. Moved, not deleted."""
    directory = checkpoint_dir(run_dir)
    later = [path for number, path in step_files(directory) if number > step] if directory.is_dir() else []
    if not later:
        return None
    aside, n = directory / f"after-step-{step:06d}", 1
    while aside.exists():  # gone back to this step before: that stretch's files stay where they were put
        n += 1
        aside = directory / f"after-step-{step:06d}-{n}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)  # same file system: a rename, atomic, no copy
    _fsync_dir(directory)
    return aside


def step_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N.pt in `directory`, oldest first: by number, since from step 1,000,000 on the
    names (step-%06d) no longer sort as text."""
    return sorted((int(m[1]), p) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name)))


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A .pt file as is, or a run directory -> its best.pt (or last.pt) checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        directory = checkpoint_dir(path) if checkpoint_dir(path).is_dir() else path
        order = ["best.pt", "last.pt"] if prefer == "best" else ["last.pt", "best.pt"]
        for name in order:
            if (directory / name).is_file():
                return directory / name
        raise CheckpointError(f"no checkpoint in {path}: expected {checkpoint_dir(path)}/best.pt or last.pt; has training saved one yet?")
    raise CheckpointError(f"checkpoint not found: {path} (give a run directory or a .pt file)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load safely (weights_only=True) and check the format version."""
    path = Path(path)
    try:
        with open(path, "rb"):  # is_zipfile below takes an unreadable file (permissions, I/O) for a non-zip
            pass
    except FileNotFoundError:
        pass  # a run directory, or missing: torch.load's error below
    except OSError as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e.strerror or e}") from None
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whole or not at all
        raise CheckpointError(f"{path} is not a checkpoint: not a zip archive as torch.save writes (empty, cut short, or another kind of file){_other_saves(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values ({first}). "
            "nmtkit loads checkpoints with weights_only=True so that a file can't run code; "
            "only load it unsafely if you trust whoever made it"
        ) from None
    except Exception as e:  # a damaged file fails in many ways inside torch.load
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(e).__name__}: {first[:300]}); the file is damaged or not a checkpoint{_other_saves(path)}"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not an nmtkit checkpoint (no format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer; the file is not a valid nmtkit checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this nmtkit reads ({FORMAT_VERSION}); upgrade nmtkit"
        )
    missing = [k for k in ("config", "tokenizer", "model") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    if "model_sha256" in state and weights_digest(state["model"]) != state["model_sha256"]:
        raise CheckpointError(f"{path}: the weights do not match their checksum; the file is damaged. Use another checkpoint")
    return state


def _other_saves(path: Path) -> str:
    """For an unreadable file of a run's checkpoints/: the newest other save there, and for last.pt how to resume from
    it (the damaged file may be a link of the newest step file, so only files of another inode count)."""
    try:
        inode = path.stat().st_ino
        others = [p for _, p in step_files(path.parent) if p.stat().st_ino != inode]
    except OSError:
        return ""
    if not others:
        return ""
    newest = others[-1]
    if path.name == "last.pt":
        return f". The newest other save is {newest.name}: `ln -f {shlex.quote(str(newest))} {shlex.quote(str(path))}` resumes from it"
    return f". The newest other save is {newest}"


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
