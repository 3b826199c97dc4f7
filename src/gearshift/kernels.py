"""Native kernels: built from `csrc/` with the machine's C++ compiler on first use, cached on disk.

`attend()` returns the exact attention op (`csrc/attention.cpp`): every row of a step in one call
per layer, each row computed on its own with a fixed instruction order, so results never depend
on how rows are grouped. Where it cannot be built or loaded (no compiler, another platform, a
CUDA model, or GEARSHIFT_KERNELS=0) the engine falls back to attending row by row with PyTorch
(`attention.py`), which is exact in the same sense; one process uses one of the two throughout.

The build takes ~20 s once per machine (it is keyed by the source, the compiler, PyTorch's
version and the CPU's vector extensions) and lands under $GEARSHIFT_HOME/kernels by an atomic
rename, so concurrent first runs cannot leave a half-written library behind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .hub import home

SOURCE = Path(__file__).parent / "csrc" / "attention.cpp"
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    flags = ["-mavx2", "-mfma"] if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags() else []
    lib = cpp_extension.library_paths()[0]
    return ([os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-w", *flags,
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()]
            + [str(SOURCE), "-o", str(out), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"])


def _library() -> Path:
    """The built library, building it first if this machine has none yet."""
    probe = _compile_command(Path("out.so"))
    try:
        compiler = subprocess.run([probe[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"no C++ compiler ({e})") from None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, torch.__version__, platform.machine(),
                                    " ".join(probe)]).encode()).hexdigest()[:16]
    path = home() / "kernels" / f"gearshift-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    print("gearshift: building the attention kernel (once per machine, ~20 s) ...", file=sys.stderr)
    try:
        proc = subprocess.run(_compile_command(tmp), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["compiler failed"])[-1])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def attend():
    """The native exact attention op, or None where it is unavailable (one notice, then silence)."""
    if "attend" not in _state:
        op = None
        if os.environ.get("GEARSHIFT_KERNELS", "1") != "0":
            try:
                torch.ops.load_library(str(_library()))
                op = torch.ops.gearshift.attend
            except Exception as e:  # anything: the PyTorch path is always there
                print(f"gearshift: native attention unavailable, attending row by row in PyTorch ({e})",
                      file=sys.stderr)
        _state["attend"] = op
    return _state["attend"]
