"""A full disk or a refused write becomes one line naming the file and the fix, whichever
library reported it, and never costs an earlier result."""

from __future__ import annotations

import errno
import os
import pathlib
from types import SimpleNamespace

import pytest

from conftest import tiny_model
from hgsp.cli import main
from hgsp.atomic import atomic_write
from hgsp.errors import UserError, naming_path, write_failure
from hgsp.save import ResultsDir, save_bin

# how safetensors (Rust) has worded a full disk, old and new
SAFETENSORS_FULL = [
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })',
    "Error while serializing: I/O error: No space left on device (os error 28)",
]


@pytest.mark.parametrize("text", SAFETENSORS_FULL)
def test_library_error_becomes_os_error_naming_the_file(text, tmp_path):
    with pytest.raises(OSError) as info, naming_path(tmp_path / "model.safetensors"):
        raise RuntimeError(text)  # safetensors raises its own type, not an OSError
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "model.safetensors")


def test_unrelated_errors_pass_unchanged(tmp_path):
    with pytest.raises(ValueError), naming_path(tmp_path):
        raise ValueError("bad shape")
    assert write_failure(ValueError("bad shape")) is None
    assert write_failure(OSError(errno.ENOENT, "No such file", "x")) is None


@pytest.mark.parametrize("free,raised", [(0, OSError), (1 << 50, RuntimeError)])
def test_torch_write_failure_checks_free_space(free, raised, tmp_path, monkeypatch):
    """torch.save says only "file write failed": with too little free space that is named a
    full disk; otherwise its own error stands."""
    def failing_save(obj, path):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("hgsp.save.torch.save", failing_save)
    monkeypatch.setattr("hgsp.save.shutil.disk_usage", lambda p: SimpleNamespace(free=free))
    with pytest.raises(raised) as info:
        save_bin(tiny_model("llama"), tmp_path / "pruned_model.bin")
    if raised is OSError:
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(tmp_path / "pruned_model.bin")


def earlier_result(parent: pathlib.Path) -> pathlib.Path:
    (parent / "run").mkdir(parents=True)
    (parent / "run" / "summary.json").write_text("earlier")
    return parent / "run" / "summary.json"


def test_write_error_without_file_name_names_the_folder(tmp_path):
    """``file.write()`` errors carry no file name: the results folder is named instead."""
    earlier = earlier_result(tmp_path)
    with pytest.raises(UserError, match=r"^disk full while writing '.*run': free space or use "
                       "--results_dir on another disk$"):
        with ResultsDir(tmp_path, "run", overwrite=True) as results:
            results.path("summary.json").write_text("new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert earlier.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failure_outside_the_folder_does_not_blame_results_dir(tmp_path):
    """A full cache disk, say: --results_dir would not help, so it is not suggested."""
    cache_file = tmp_path / "cache" / "entry.json"
    with pytest.raises(UserError) as info:
        with ResultsDir(tmp_path, "run", overwrite=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cache_file))
    assert str(info.value) == f"disk full while writing '{cache_file}': free space"


def test_failed_swap_puts_earlier_result_back(tmp_path, monkeypatch):
    earlier = earlier_result(tmp_path)
    rename = pathlib.Path.rename

    def refuse_tmp(self, target):
        if self.name.startswith(".run.tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", refuse_tmp)
    with pytest.raises(UserError, match=r"^permission denied for '.*run': check its "
                       "permissions or use another --results_dir$"):
        with ResultsDir(tmp_path, "run", overwrite=True) as results:
            results.path("summary.json").write_text("new")
    assert earlier.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_result_created_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    """Two runs with one --output_name: the one finishing second keeps its results aside."""
    with pytest.raises(UserError, match=r"was created by another run while this one worked: "
                       r"this run's results are in '.*run-[0-9a-f]{8}'"):
        with ResultsDir(tmp_path, "run", overwrite=False) as results:
            results.path("summary.json").write_text("new")
            earlier_result(tmp_path)  # the other run publishes first
    assert (tmp_path / "run" / "summary.json").read_text() == "earlier"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run-")]
    assert len(kept) == 1 and (kept[0] / "summary.json").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_names_a_full_disk_outside_a_run(tmp_path, capsys, monkeypatch):
    """e.g. ``hgsp eval --output`` or ``hgsp compare --output`` on a full disk."""
    target = tmp_path / "evaluation_results.json"

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr("hgsp.cli._run", full)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: disk full while writing '{target}': free space\n"


def test_failed_atomic_write_keeps_the_earlier_file(tmp_path):
    """Outputs written outside a run's temporary folder (benchmark JSON, ``hgsp compare``
    tables, reports) go through atomic_write: a write that fails half-way leaves the earlier
    file as it was and no temporary file behind."""
    target = tmp_path / "comparison.md"
    target.write_text("earlier result")

    def half_then_full(tmp):
        tmp.write_text("half a tab")
        raise RuntimeError("I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as info:
        atomic_write(target, half_then_full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.md"]
    atomic_write(target, lambda tmp: tmp.write_text("new result"))
    assert target.read_text() == "new result"
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.md"]
