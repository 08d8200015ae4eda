"""The Python API takes paths as str, pathlib.Path or any os.PathLike, in every function and
options object (a plain string once failed with "'str' object has no attribute 'mkdir'"), and
every public function says what it does."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from sslctl import api
from sslctl.api.checkpoints import list_run


class Where(os.PathLike):
    """An os.PathLike that is neither str nor pathlib.Path."""

    def __init__(self, path: Path):
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_every_api_function_has_a_docstring():
    for name in api.__all__:
        obj = getattr(api, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    assert list_run.__doc__


@pytest.mark.slow
def test_pretrain_extract_knn_checkpoints_and_data_check_take_str_and_pathlike(
    tmp_path, shared_images, image_folder, tiny_profile
):
    data = shared_images(n=24)
    prof = tiny_profile()
    run = tmp_path / "run"
    res = api.pretrain(str(prof), str(run), str(data), max_steps=1)
    assert res.fit.step == 1 and (run / "checkpoints").is_dir()
    assert [c.step for c in list_run(str(run))] == [1]
    assert [c.step for c in list_run(Where(run))] == [1]

    bb = tmp_path / "bb.safetensors"
    assert api.extract(Where(run), str(bb)).output == bb and bb.is_file()

    labelled = tmp_path / "labelled"
    for split in ("train", "val"):
        image_folder(f"labelled/{split}", n=12, size=16)
    out = tmp_path / "knn"
    opts = api.KnnEvalOptions(weights=str(bb), data=Where(labelled), out=str(out), k=3)  # type: ignore[arg-type]
    assert isinstance(opts.weights, Path) and isinstance(opts.out, Path)
    assert opts.data == str(labelled)  # data also takes "bundled": a str
    r = api.knn_eval(str(bb), data=Where(labelled), out=str(out), k=3)
    assert 0.0 <= r.results["top1"] <= 100.0 and (out / "results.json").is_file()

    checked = api.data_check(str(data))
    assert checked.total == 24
    checked = api.data_check(Where(data))
    assert checked.total == 24


def test_options_objects_convert_every_path_field(tmp_path):
    o = api.LinearEvalOptions(weights=str(tmp_path / "w"), train=Where(tmp_path / "t"), out="x")  # type: ignore[arg-type]
    assert o.weights == tmp_path / "w" and o.train == tmp_path / "t" and o.out == Path("x")
    # str fields (they also take names: "bundled", a bundled profile) get a str, Path or not
    o = api.KnnEvalOptions(weights="w", data=tmp_path, profile=Path("my.yaml"))  # type: ignore[arg-type]
    assert o.data == str(tmp_path) and o.profile == "my.yaml"
    r = api.EvalReidOptions(query=str(tmp_path / "q"), query_features=Where(tmp_path / "f"))  # type: ignore[arg-type]
    assert r.query == tmp_path / "q" and r.query_features == tmp_path / "f"
