"""eval-reid as a user meets it (``python -m sslctl eval-reid`` in a subprocess): every option
refused before any work, --out checked up front, malformed features metadata, layout
auto-detection, provenance in results.json with one file per options, the CMC step plot."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sslctl import UserError
from sslctl.api.eval_reid import validate
from sslctl.eval.reid import features as rf
from sslctl.eval.reid import layouts as rl
from sslctl.eval.reid import plot as reid_plot
from sslctl.eval.reid.options import EvalReidOptions
from tests.reid_helpers import (
    make_backbone,
    make_market,
    make_sysu,
    write_features,
    write_image,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
CPU = ("--device", "cpu", "--workers", "0")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sslctl", "eval-reid", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _error_line(r: subprocess.CompletedProcess[str], *names: str) -> str:
    """The command failed as a user mistake: exit 2, no traceback, exactly one 'error:' line
    (under 300 characters) that names every one of ``names``."""
    output = r.stdout + r.stderr
    assert r.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == errors[0]  # the last word, nothing after it
    assert len(errors[0]) < 300, errors[0]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("market")
    return make_market(base / "Market"), make_backbone(base / "r18.safetensors")


@pytest.fixture(scope="module")
def detected_run(market, tmp_path_factory):
    """One run without --layout (a Market-1501 tree) and with --cmc-log-x."""
    data, weights = market
    out = tmp_path_factory.mktemp("detected") / "out"
    r = _cli(str(weights), "--data", str(data), "--out", str(out), "--cmc-log-x", *CPU)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture
def copied_out(detected_run, tmp_path) -> Path:
    """A copy of detected_run's --out folder, for a test that runs the command into it again."""
    out = tmp_path / "out"
    shutil.copytree(detected_run[0], out)
    return out


# 1. every option is checked before weights are read, features extracted or ranks computed


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--ties", "sideways"),
        ("--ap", "mean"),
        ("--denominator", "some"),
        ("--metric", "manhattan"),
        ("--precision", "fp8"),
        ("--device", "gpu"),
        ("--layout", "market"),
    ],
)
def test_a_bad_option_is_refused_before_any_work(market, tmp_path, flag, value):
    data, _ = market
    # Weights that cannot be read: had the command loaded them first, the error would say so.
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = _cli(str(weights), "--data", str(data), "--layout", "market1501", "--out", str(out),
             *CPU, flag, value)  # fmt: skip
    line = _error_line(r, flag, value)
    assert "safetensors" not in line
    assert not out.exists()  # no features/, ranks or results: nothing ran
    assert time.perf_counter() - t0 < 120  # start-up only (an extraction on CPU is longer)


def test_validate_checks_every_option_without_touching_anything(market, tmp_path):
    data, weights = market
    base = {"weights": weights, "data": data, "out": tmp_path / "o", "device": "cpu"}
    for extra, said in [
        ({"camera_regex": "c("}, "--camera-regex 'c(' is not a valid regex"),
        ({"workers": -1}, "--workers must be 0 or more"),
        ({"cache_dtype": "int8"}, "--cache-dtype must be one of fp32, fp16"),
        ({"part": "teacher"}, "--part must be one of online, target"),
        ({"compat": "matlab"}, "--compat must be one of"),
        ({"max_rank": 0}, "--max-rank must be a positive number"),
        ({"flip_fusion": "mean"}, "--flip-fusion must be one of"),
    ]:
        with pytest.raises(UserError, match=re.escape(said)):
            validate(EvalReidOptions(**base, **extra))
    o = validate(EvalReidOptions(**base))
    assert (o.layout, o.ap, o.denominator) == ("market1501", "standard", "valid")
    assert not (tmp_path / "o").exists()  # checked, not created


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_up_front(market, tmp_path):
    data, weights = market
    r = _cli(str(weights), "--data", str(data), "--out", str(tmp_path / "out"),
             "--device", "cuda")  # fmt: skip
    _error_line(r, "--device cuda", "--device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_paths_are_refused_up_front(market, tmp_path):
    data, weights = market
    r = _cli(str(tmp_path / "missing.pt"), "--data", str(data), "--out", str(tmp_path / "o"))
    _error_line(r, "missing.pt", "no such file")
    r = _cli(str(weights), "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"))
    _error_line(r, "--data", "nodata")
    r = _cli("--query-features", str(tmp_path / "q.safetensors"), "--gallery-features",
             str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "o"))  # fmt: skip
    _error_line(r, "--query-features", "q.safetensors")
    assert not (tmp_path / "o").exists()


# 2. --out that cannot hold the results


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_an_unusable_out_is_one_line_before_any_work(market, tmp_path, case):
    data, weights = market
    if case == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    holder = tmp_path / "run[1]"  # brackets: Rich markup must not eat them
    if case == "read_only":
        holder.mkdir()
        holder.chmod(0o555)
        out = holder / "out"
    else:
        holder.write_text("a file, not a folder")
        out = holder if case == "file" else holder / "out"
    try:
        r = _cli(str(weights), "--data", str(data), "--out", str(out), *CPU)
        line = _error_line(r, "--out", str(holder))
    finally:
        if holder.is_dir():
            holder.chmod(0o755)
    assert ("existing file" if case == "file" else "choose") in line
    assert not (tmp_path / "features").exists()


# 3. features files whose paths/hashes metadata is malformed


MALFORMED = [
    ({"paths": '{"a": 1}'}, "'paths' is not a JSON list of strings"),
    ({"paths": json.dumps(["a.jpg"])}, "'paths' lists 1 entries but the file holds 2"),
    ({"hashes": "oops"}, "'hashes' is not a JSON list of strings"),
    ({"paths": json.dumps([1, 2])}, "'paths' is not a JSON list of strings"),
]


def _malformed_pair(tmp_path: Path, meta: dict[str, str]) -> tuple[Path, Path]:
    q = write_features(tmp_path / "q.safetensors", [[1, 0], [0, 1]], [1, 2], [0, 0], meta)
    g = write_features(tmp_path / "g.safetensors", [[1, 0], [0, 1]], [1, 2], [1, 1])
    return q, g


@pytest.mark.parametrize(("meta", "said"), MALFORMED)
def test_malformed_features_metadata_is_a_user_error_not_a_type_error(tmp_path, meta, said):
    q, _ = _malformed_pair(tmp_path, meta)
    with pytest.raises(UserError, match="drop the key") as e:
        rf.load(q)
    assert said in str(e.value) and str(q) in str(e.value)


@pytest.mark.parametrize(("meta", "said"), MALFORMED[:2])
def test_a_features_file_with_malformed_metadata_is_refused(tmp_path, meta, said):
    q, g = _malformed_pair(tmp_path, meta)
    r = _cli("--query-features", str(q), "--gallery-features", str(g),
             "--out", str(tmp_path / "out"))  # fmt: skip
    _error_line(r, str(q), said)


@pytest.mark.slow  # a whole eval-reid run in a subprocess
def test_a_features_cache_with_malformed_rows_is_stale_and_recomputed(market, copied_out):
    data, weights = market
    out = copied_out
    cache = out / "features" / "query.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k)[:-1].contiguous() for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(cache), metadata=meta)  # the same metadata, one row fewer
    r = _cli(str(weights), "--data", str(data), "--out", str(out), *CPU)
    assert r.returncode == 0, r.stderr[-3000:]
    stderr = " ".join(r.stderr.split())  # Rich wraps long warnings
    assert "stale features cache, extracting again" in stderr
    assert "'paths' lists 4 entries but the file holds 3" in stderr
    assert "features extracted: query;" in r.stdout
    assert len(rf.load(cache).ids) == 4


# 4. layout detection


@pytest.mark.slow  # a whole eval-reid run in a subprocess
def test_the_layout_is_detected_and_said(detected_run):
    out, r = detected_run
    assert "layout: market1501 (detected: query/ + bounding_box_test/;" in r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["layout"] == "market1501" and res["ap_definition"] == "standard"
    assert res["options"]["layout"] == "market1501"


def test_detect_layout_knows_sysu_and_market_trees(tmp_path):
    sysu = make_sysu(tmp_path / "sysu")
    assert rl.detect_layout(sysu, None, None)[0] == "sysu30k"
    flat = make_sysu(tmp_path / "flat", flat=True)
    assert rl.detect_layout(flat, None, None)[0] == "sysu30k"
    assert rl.detect_layout(None, sysu / "query", sysu / "gallery")[0] == "sysu30k"
    nested = make_market(tmp_path / "m" / rl.MARKET_SUBDIR).parent
    layout, why = rl.detect_layout(nested, None, None)
    assert layout == "market1501" and rl.MARKET_SUBDIR in why
    both = make_sysu(tmp_path / "both")
    write_image(both / "bounding_box_test" / "0001_c1s1_000001_00.jpg", seed=1)
    with pytest.raises(UserError, match="fits both market1501 and sysu30k"):
        rl.detect_layout(both, None, None)


@pytest.mark.slow  # a whole eval-reid run in a subprocess
def test_a_sysu_tree_without_layout_runs_with_the_sysu_defaults(market, tmp_path):
    _, weights = market
    data = make_sysu(tmp_path / "sysu")
    out = tmp_path / "out"
    r = _cli(str(weights), "--data", str(data), "--out", str(out), *CPU)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layout: sysu30k (detected: query/ + gallery/ with 0000others;" in r.stderr
    res = json.loads((out / "results.json").read_text())
    assert (res["layout"], res["ap_definition"], res["denominator"]) == (
        "sysu30k",
        "trapezoid",
        "all",
    )


@pytest.mark.parametrize(
    ("tree", "said"),
    [
        (("query", "gallery"), "query/ + gallery/ without 0000others"),
        (("images", "notes"), "no query/ beside bounding_box_test/ or gallery/"),
    ],
)
def test_an_unknown_or_ambiguous_tree_lists_what_it_found(market, tmp_path, tree, said):
    _, weights = market
    data = tmp_path / "data"
    for name in tree:
        write_image(data / name / "1" / "0001_c1_1.jpg", seed=1)
    r = _cli(str(weights), "--data", str(data), "--out", str(tmp_path / "out"), *CPU)
    line = _error_line(r, said, "--layout sysu30k, market1501 or imagefolder")
    assert all(f"{name}/" in line for name in tree)


# 5. provenance, and one results file per set of options


@pytest.mark.slow  # a whole eval-reid run in a subprocess
def test_results_record_provenance_and_runs_with_other_options_are_kept(
    market, detected_run, copied_out
):
    data, weights = market
    _, r1 = detected_run
    out = copied_out
    res1 = json.loads((out / "results.json").read_text())
    assert res1["weights"]["path"] == str(weights)
    assert res1["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert res1["data"] == {
        "query": str((data / "query").resolve()),
        "gallery": str((data / "bounding_box_test").resolve()),
    }
    assert res1["sslctl_version"] == __import__("sslctl").__version__
    assert res1["options"]["ties"] == "pessimistic" and res1["options"]["cmc_log_x"] is True
    h1 = res1["options_hash"]
    assert len(h1) == 10 and res1["results_files"]["this_run"] == f"results-{h1}.json"
    assert json.loads((out / f"results-{h1}.json").read_text()) == res1
    assert f"results-{h1}.json" in r1.stdout

    r2 = _cli(str(weights), "--data", str(data), "--out", str(out), "--ap", "trapezoid", *CPU)
    assert r2.returncode == 0, r2.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    h2 = res2["options_hash"]
    assert h2 != h1 and res2["ap_definition"] == "trapezoid"
    assert f"results-{h2}.json" in r2.stdout
    assert json.loads((out / f"results-{h1}.json").read_text()) == res1  # the first is kept
    assert json.loads((out / f"results-{h2}.json").read_text()) == res2
    assert sorted(p.name for p in out.glob("results*.json")) == sorted(
        ["results.json", f"results-{h1}.json", f"results-{h2}.json"]
    )
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".sslctl*"))


# 6. the CMC plot


@pytest.mark.slow  # a whole eval-reid run in a subprocess
def test_cmc_plot_is_a_step_plot_with_the_headline_and_a_log_axis(detected_run, tmp_path):
    out, _ = detected_run
    res = json.loads((out / "results.json").read_text())
    with Image.open(out / "cmc.png") as im:
        assert im.size == (720, 480)
        text = dict(im.text)  # type: ignore[attr-defined]
    assert text["xscale"] == "log" and text["drawstyle"] == "steps-post"
    assert f"rank-1 {res['rank1']:.2f}%" in text["Title"]
    assert f"mAP {res['mAP']:.2f}%" in text["Title"]
    assert (out / f"cmc-{res['options_hash']}.png").is_file()

    cmc = [25.0, 50.0, 50.0, 100.0]
    assert reid_plot.step_points(cmc) == [
        (1, 25.0), (2, 25.0), (2, 50.0), (3, 50.0), (3, 50.0), (4, 50.0), (4, 100.0),
    ]  # fmt: skip
    assert reid_plot.x_fraction(10, 100, log_x=True) == pytest.approx(0.5)
    assert reid_plot.x_fraction(10, 19, log_x=False) == pytest.approx(0.5)
    plot = reid_plot.save_cmc_plot(tmp_path / "lin.png", cmc, "CMC t", m_ap=12.5)
    assert plot.xscale == "linear" and plot.title == "CMC t: rank-1 25.00%, mAP 12.50%"
    log_plot = reid_plot.save_cmc_plot(tmp_path / "log.png", cmc, "CMC t", m_ap=12.5, log_x=True)
    assert log_plot.xscale == "log"
    with Image.open(tmp_path / "lin.png") as a, Image.open(tmp_path / "log.png") as b:
        assert a.text["xscale"] == "linear"  # type: ignore[attr-defined]
        assert a.tobytes() != b.tobytes()  # the axis really changed


# 7. the CLI module without torch, and its help


def test_help_names_the_new_options():  # no torch on import: tests/test_cli_help.py
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    assert "--cmc-log-x" in r.stdout and "0000others" in r.stdout


def test_huge_image_is_refused_before_decoding(tmp_path):
    """A re-ID image over the pixel limit is one DecodeError (kind huge) read from the header,
    not a 200 MB decode (PIL's own limit is off: sslctl checks sizes itself)."""
    from PIL import Image

    from sslctl.data.readers import DecodeError
    from sslctl.eval.reid.layouts import ReidImages

    path = tmp_path / "0001_c1_huge.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 M pixels, a few kB on disk
    with pytest.raises(DecodeError, match="over the limit") as e:
        ReidImages([path])[0]
    assert e.value.kind == "huge"
