"""Native kernels: built from `csrc/` with the machine's C++ compiler on first use, cached on disk.

`attend()` returns the exact attention op (`csrc/attention.cpp`): every row of a step in one call
per layer, each row computed on its own with a fixed instruction order, so results never depend
on how rows are grouped. `linear()` says whether the quantized matrix products
(`csrc/linear.cpp`) are there; they unpack each weight block once for up to four rows, which is
what keeps a k-token forward cheap. Where the library cannot be built or loaded (no compiler,
another platform, a CUDA model, or GEARSHIFT_KERNELS=0) the engine falls back to PyTorch: row by
row attention (`attention.py`) and PyTorch's packed int4/int8 kernels, exact in the same sense;
one process uses one of the two throughout. Which path each operation takes on a device is
decided in one place, `paths`.

The build takes ~30 s once per machine, one compiler per source in parallel. It is keyed by the
sources, the compiler, PyTorch's version and the CPU's vector extensions, and lands under
$GEARSHIFT_HOME/kernels by an atomic rename, so concurrent first runs cannot leave a half-written
library behind.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import home

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("attention.cpp", "linear.cpp", "block.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "simd.h"]
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


_VNNI = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], "avx": ["-mavxvnni"]}


def vnni() -> str | None:
    """Which VNNI the kernels are built with: "avx512" (AVX-512 VNNI and VL), "avx" (AVX-VNNI) or
    None (none on this CPU, or GEARSHIFT_VNNI=0: `madd` then `add`, which gives the same bits)."""
    cpu = _cpu_flags()
    if os.environ.get("GEARSHIFT_VNNI") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu:
        return "avx512"
    return "avx" if "avx_vnni" in cpu else None


def _commands(out: Path) -> tuple[list[list[str]], list[str]]:
    """One compile command per source (run in parallel) and the link command."""
    from torch.utils import cpp_extension

    x86 = platform.machine() in ("x86_64", "AMD64")
    cpu = _cpu_flags() if x86 else set()
    flags = ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= cpu else []
    # VNNI fuses the int4 kernel's multiply and add (the same integers, so the same results); with
    # AVX-512 it also gives the compiler 32 vector registers, which the four-row tiles need
    flags += _VNNI.get(vnni(), []) if flags else []
    lib = cpp_extension.library_paths()[0]
    cxx = os.environ.get("CXX", "c++")
    # -fopenmp: ATen's parallel_for is a header template that runs on OpenMP; compiled without it,
    # it silently runs on one thread (the process shares PyTorch's libgomp.so.1)
    compile_flags = [
        "-O3",
        "-std=c++17",
        "-fPIC",
        "-fopenmp",
        "-w",
        *flags,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ] + [f"-I{p}" for p in cpp_extension.include_paths()]
    objects = [out.with_name(f"{out.name}.{src.stem}.o") for src in SOURCES]
    compiles = [[cxx, *compile_flags, "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]
    link = [
        cxx,
        "-shared",
        "-fopenmp",
        *map(str, objects),
        "-o",
        str(out),
        f"-L{lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib}",
    ]
    return compiles, link


def _library() -> Path:
    """The built library, building it first if this machine has none yet."""
    compiles, link = _commands(Path("out.so"))
    try:
        compiler = subprocess.run([link[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"no C++ compiler ({e})") from None
    key = hashlib.sha256(
        "\n".join(
            [
                *(s.read_text() for s in SOURCES + HEADERS),
                compiler,
                torch.__version__,
                platform.machine(),
                *(" ".join(c) for c in compiles),
            ]
        ).encode()
    ).hexdigest()[:16]
    path = home() / "kernels" / f"gearshift-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    compiles, link = _commands(tmp)
    print("gearshift: building the native kernels (once per machine, ~30 s) ...", file=sys.stderr)
    try:
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in compiles]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError((err.strip().splitlines() or ["compiler failed"])[-1])
        proc = subprocess.run(link, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["linker failed"])[-1])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for obj in tmp.parent.glob(f"{tmp.name}.*.o"):
            obj.unlink(missing_ok=True)
    return path


def _load() -> bool:
    """Build and load the library once per process; False (after one notice) where it cannot be."""
    if "loaded" not in _state:
        ok = False
        if os.environ.get("GEARSHIFT_KERNELS", "1") != "0":
            try:
                torch.ops.load_library(str(_library()))
                ok = True
            except Exception as e:  # anything: the PyTorch paths are always there
                print(f"gearshift: native kernels unavailable, using PyTorch's ({e})", file=sys.stderr)
        _state["loaded"] = ok
    return bool(_state["loaded"])


def version() -> str:
    """What computes a forward in this process: the native library's source hash, or "pytorch"
    (part of the key of anything measured, e.g. the forward-cost curve)."""
    return (
        hashlib.sha256("".join(s.read_text() for s in SOURCES + HEADERS).encode()).hexdigest()[:12]
        if _load()
        else "pytorch"
    )


def attend():
    """The native exact attention op, or None where it is unavailable."""
    return torch.ops.gearshift.attend if _load() else None


def attend_q():
    """`attend` for batches with quantized slots (their quantized copies as extra arguments)."""
    return torch.ops.gearshift.attend_q if _load() else None


def linear() -> bool:
    """Whether the native quantized matrix products (`csrc/linear.cpp`: AVX2/FMA/F16C) are there."""
    if not _load():
        return False
    if "simd" not in _state:
        _state["simd"] = bool(torch.ops.gearshift.simd())
    return bool(_state["simd"])


@dataclass(frozen=True)
class Paths:
    """Which implementation each hot operation takes for one device and dtype: the one place that
    decides (the model, attention, the KV cache and the model runner all ask `paths`)."""

    linear: bool  # packed int4/int8 products on gearshift::linear_q4/q8 (else PyTorch's packed kernels)
    attention: bool  # exact attention of a step's rows in one gearshift::attend call per layer (else per row)
    block: bool  # a whole int4 block as one gearshift::block op (needs both)


@functools.cache
def paths(device_type: str, dtype: torch.dtype) -> Paths:
    cpu = device_type == "cpu"
    lin = cpu and linear()
    att = cpu and dtype == torch.float32 and attend() is not None
    return Paths(lin, att, lin and att)
