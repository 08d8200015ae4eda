"""The preflight index (sslctl.data.index), `sslctl data check`, and backend selection.

None of this needs DALI: the scan decodes with PIL (tests/test_dali.py shows DALI agrees)."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sslctl import UserError, api
from sslctl.cli.app import app
from sslctl.data import index as ix
from sslctl.data.readers import scan_imagefolder
from sslctl.data.select import resolve_backend
from tests.image_helpers import make_odd_folder, photo


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSLCTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build(root: Path, **kw: object) -> ix.IndexBuild:
    samples, _ = scan_imagefolder(root)
    return ix.build_index([p for p, _ in samples], root, ix.index_path(root), **kw)  # type: ignore[arg-type]


def test_every_kind_is_classified(tmp_path: Path) -> None:
    expected = make_odd_folder(tmp_path / "data")
    idx = _build(tmp_path / "data").index
    got = {os.path.basename(r): ix.KINDS[k] for r, k in zip(idx.rel, idx.kind, strict=True)}
    assert got == expected
    usable = {os.path.basename(r) for r, u in zip(idx.rel, idx.usable(), strict=True) if u}
    assert usable == {n for n, k in expected.items() if k in ix.USABLE}
    assert sum(idx.counts().values()) == len(expected)
    assert idx.counts()["truncated"] == 2
    # sizes recorded for decodable files, reasons for unusable ones
    i = idx.rel.index("x/ok.jpg")
    assert (idx.width[i], idx.height[i]) == (40, 30)
    assert "truncated" in idx.reasons["x/trunc.jpg"]
    assert idx.reasons["x/zero.jpg"] == "empty file"


def test_index_is_cached_and_only_changed_files_are_rechecked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_odd_folder(root)
    first = _build(root)
    assert first.checked == 14 and first.path.is_file()
    again = _build(root)
    assert again.checked == 0
    assert again.index.rel == first.index.rel
    assert np.array_equal(again.index.kind, first.index.kind)
    assert again.index.reasons == first.index.reasons
    # repair a truncated file, add one: exactly those two are decoded again
    photo(seed=3).save(root / "x" / "trunc.jpg")
    photo(seed=4).save(root / "x" / "new.jpg")
    third = _build(root)
    assert third.checked == 2
    assert third.index.counts()["truncated"] == 1
    assert third.index.counts()["ok"] == first.index.counts()["ok"] + 2
    # verify=False trusts the cache for the same path list without stat'ing anything
    assert _build(root, verify=False).checked == 0


def test_corrupt_or_foreign_cache_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_odd_folder(root)
    path = _build(root).path
    path.write_bytes(b"garbage")
    assert ix.load_index(path) is None
    assert _build(root).checked == 14
    assert _build(root, rescan=True).checked == 14


def test_index_path_depends_on_root_and_list_file(tmp_path: Path, _cache: Path) -> None:
    a, b = ix.index_path(tmp_path / "a"), ix.index_path(tmp_path / "b")
    assert a != b and a.parent == _cache / "index"
    assert ix.index_path(tmp_path / "a", tmp_path / "a" / "l.txt") != a
    assert ix.index_path(str(tmp_path / "a")) == a


def test_relative_paths_outside_root_stay_absolute(tmp_path: Path) -> None:
    root = str(tmp_path / "r")
    rel = ix.relative_paths([f"{root}/c/1.jpg", "/elsewhere/2.jpg"], root)
    assert rel == ["c/1.jpg", "/elsewhere/2.jpg"]


def test_api_data_check_with_list_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_odd_folder(root)
    (root / "list.txt").write_text("x/ok.jpg 3\nx/zero.jpg 1\n")
    r = api.data_check(root, Path("list.txt"))
    assert r.total == 2 and r.usable == 1
    assert r.odd == [(str(root / "x" / "zero.jpg"), "zero-byte", "empty file")]
    assert r.index_path == ix.index_path(root, root / "list.txt")
    with pytest.raises(UserError, match="--threads"):
        api.data_check(root, threads=0)


def test_cli_data_check(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_odd_folder(root)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "check", str(root), "--show", "3"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "14 images, 8 usable" in out
    assert "truncated │ 2 │ skipped" in out
    assert "png-named-jpeg │ 1 │ used" in out
    assert "… and 8 more" in out
    assert str(ix.index_path(root)) in res.output.replace("\n", "")
    assert "14 file(s) decoded now" in out
    res = runner.invoke(app, ["data", "check", str(root), "--strict"])
    assert res.exit_code == 1
    assert "0 file(s) decoded now" in " ".join(res.output.split())
    res = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "Traceback" not in res.output


def test_backend_selection() -> None:
    assert resolve_backend("torchvision", cuda=True, have_dali=True) == "torchvision"
    assert resolve_backend("auto", cuda=True, have_dali=True) == "dali"
    assert resolve_backend("auto", cuda=True, have_dali=False) == "torchvision"
    assert resolve_backend("auto", cuda=False, have_dali=True) == "torchvision"
    with pytest.raises(UserError, match="choose auto"):
        resolve_backend("opencv", cuda=False)


def test_asking_for_missing_dali_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_dali(name: str, *args: object, **kw: object) -> object:
        if name.startswith("nvidia.dali") or (name == "nvidia" and "dali" in str(args)):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(UserError) as e:
        resolve_backend("dali", cuda=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip install 'sslctl[dali]'" in msg and "data.backend=torchvision" in msg


def test_auto_backend_probes_dali_on_the_gpu_and_falls_back(capsys: pytest.CaptureFixture) -> None:
    """An importable DALI that cannot run on this GPU (e.g. the cuda130 wheel under a CUDA 12
    driver) must not be picked: the probe's reason is said once and torchvision is used."""
    calls: list[int] = []

    def broken() -> str:
        calls.append(1)
        return "CUDA driver version is insufficient for CUDA runtime version"

    assert resolve_backend("auto", cuda=True, have_dali=True, probe=broken) == "torchvision"
    err = " ".join(capsys.readouterr().err.split())
    assert "CUDA driver version is insufficient" in err and "dali-cuda12" in err
    assert calls == [1]
    assert resolve_backend("auto", cuda=True, have_dali=True, probe=lambda: None) == "dali"
    assert resolve_backend("torchvision", cuda=True, have_dali=True, probe=broken) == "torchvision"
    assert calls == [1]  # an explicit backend is not probed
    resolve_backend("auto", cuda=True, have_dali=False)
    assert "DALI is not installed" in " ".join(capsys.readouterr().err.split())
