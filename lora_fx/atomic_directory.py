"""Writing a directory as one unit: staged beside the target (other entries of an existing directory carried
over as hard links) and swapped in with one rename, so a crash midway leaves the previous contents whole; nothing is
ever written through a symbolic link.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from pathlib import Path

from lora_fx.errors import AdapterError


def write_directory(directory: Path, files: dict) -> None:
    """Write `files` ({name: write(path)}) into `directory` as one unit: staged in a sibling directory (other
    entries of an existing `directory` carried over as hard links), then swapped in by rename."""
    directory = Path(os.path.abspath(directory))
    if directory.is_symlink():
        raise AdapterError(f"cannot save into {str(directory)!r}: it is a symbolic link, and lora_fx never writes "
                           f"through links; give the real path")
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"cannot save into {str(directory)!r}: it exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = directory.with_name(f".{directory.name}.lora_fx-{uuid.uuid4().hex[:12]}")
    os.mkdir(stage)
    try:
        if directory.exists():
            shutil.copystat(directory, stage)
            for entry in directory.iterdir():
                if entry.name not in files:
                    _carry(entry, stage / entry.name)
        for name, write in files.items():
            write(str(stage / name))
        if not directory.exists():
            os.rename(stage, directory)
        elif _exchange(stage, directory):
            shutil.rmtree(stage)                        # now the previous directory
        else:                                           # no atomic exchange here: the shortest window instead
            previous = stage.with_name(stage.name + ".previous")
            os.rename(directory, previous)
            os.rename(stage, directory)
            shutil.rmtree(previous)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def _carry(entry: Path, target: Path) -> None:
    if entry.is_symlink():
        os.symlink(os.readlink(entry), target)
    elif entry.is_dir():
        shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(entry), str(target))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
