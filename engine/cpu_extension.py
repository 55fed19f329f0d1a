"""The project's C++ CPU kernels (csrc/): one extension, built on first use, loaded once
per process. cpu_paged_attention and cpu_layer_kernels call into it.

The extension is compiled from every csrc/*.cpp with -march=native into torch's extension
folder (TORCH_EXTENSIONS_DIR, else torch's default), so later processes on the same machine
load it in well under a second. Without a compiler or ninja, module() is None, the reason is
logged once, and every caller keeps its torch code.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

_CSRC = Path(__file__).parent / "csrc"
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs inline here


def _log(message: str) -> None:
    print(f"tokenpool: {message}", file=sys.stderr, flush=True)


def _cpu_signature() -> str:
    """This CPU's model and feature flags: -march=native code built on one CPU may not run
    on another that shares the extension folder (NFS home, container image)."""
    text = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return text


def _sources() -> dict[str, bytes]:
    """{file name: contents} of csrc's sources and headers."""
    return {p.name: p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".cpp", ".h")}


def _build_sources() -> list[Path]:
    """The kernel sources, copied into their build folder under torch's extension root.

    The folder's name digests the sources, this CPU, the flags and torch's version, so each
    combination is built once and then only loaded. Compiling the copies, not the installed
    files, keeps torch's build file identical for every install location, so two checkouts
    sharing TORCH_EXTENSIONS_DIR do not keep rebuilding each other's kernels.
    -> the .cpp copies (headers sit beside them).
    """
    from torch.utils import cpp_extension

    files = _sources()
    key = "\0".join([_cpu_signature(), " ".join(_CFLAGS), torch.__version__]).encode()
    if sys.prefix != sys.base_prefix:  # a venv's torch (e.g. .venv-vllm) has its own include paths in
        key += sys.prefix.encode()     # torch's build file: sharing a folder would rebuild on every switch
    key += b"".join(name.encode() + b"\0" + code for name, code in files.items())
    name = f"tokenpool_cpu_kernels_{hashlib.sha256(key).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, code in files.items():
        copy = folder / file_name
        if not copy.is_file() or copy.read_bytes() != code:
            partial = folder / f".{file_name}.{os.getpid()}"  # another process may be compiling it
            partial.write_bytes(code)
            os.replace(partial, copy)
    return [folder / n for n in files if n.endswith(".cpp")]


@dataclass(frozen=True)
class _Build:
    """The loaded extension, or why there is none."""

    module: ModuleType | None
    error: str = ""


@functools.cache
def _load() -> _Build:
    """Compile (first use on this machine) or load the extension, once per process."""
    try:
        return _Build(_compile_or_load())
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean "use torch"
        error = _one_line(exc)
        _log(f"C++ CPU kernels unavailable, using torch's ops: {error}")
        return _Build(None, error)


def _one_line(exc: Exception) -> str:
    """The gist of a failed build: torch's first line, plus the compiler's first error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
    errors = [line for line in lines[1:] if re.search(r"error|not found", line, re.IGNORECASE)
              and not line.startswith(("[", "FAILED"))]
    head = lines[0].split(": [")[0]  # torch puts the whole compile command after it
    return f"{type(exc).__name__}: {head}" + (f": {errors[0]}" if errors else "")


def _compile_or_load() -> ModuleType:
    """torch builds the extension if its folder holds no up-to-date build, then loads it."""
    from torch.utils import cpp_extension

    sources = _build_sources()
    folder = sources[0].parent
    first = not (folder / f"{folder.name}.so").exists()
    if first:
        _log(f"compiling the CPU kernels into {folder} (once per machine) ...")
    start = time.perf_counter()
    with _build_lock(folder):
        module = cpp_extension.load(name=folder.name, sources=[str(s) for s in sources],
                                    extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                                    build_directory=str(folder))
    if first:
        _log(f"CPU kernels built in {time.perf_counter() - start:.1f} s")
    return module


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Holds an flock on the build folder while torch builds or loads the extension.

    torch's own lock is a file it creates and deletes (FileBaton): a process killed while
    compiling leaves it behind and every later process waits on it forever. The kernel
    drops an flock when its holder dies, so whoever holds this one knows that a baton
    left in the folder belongs to no live build, and removes it.
    """
    with open(folder / ".tokenpool-build.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                _log(f"removing {stale}, left by a build that was killed")
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def module() -> ModuleType | None:
    """The loaded extension (compiled first if this machine has no build), or None."""
    return _load().module


def available() -> bool:
    """True when the extension builds and loads here; otherwise the reason is logged once."""
    return _load().module is not None


def unavailable_reason() -> str:
    """Why available() is False ('' when it is True)."""
    return _load().error
