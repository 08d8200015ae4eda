"""Explicit weights paths are verified and non-finite numbers refused ("never lose a good
checkpoint"): a real tiny run, then its files corrupted, stripped of their manifest or filled
with NaN, read through the real commands (CliRunner on the CLI app)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sslctl import UserError, api, checkpoint, config
from sslctl.backbones import build_backbone
from sslctl.cli.app import app
from sslctl.convert import extract as ex
from sslctl.convert.weights import read_backbone
from tests.fault_helpers import write_profile
from tests.linear_helpers import make_dataset, tiny_sets
from tests.reid_helpers import make_market

runner = CliRunner()

MISMATCH = "does not match its manifest {} (sha256 differs: corrupt or truncated)"
PICK = "pick another checkpoint (`sslctl checkpoints"
NO_MANIFEST = "no manifest beside it; its integrity cannot be checked"


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_images) -> dict[str, Path]:
    """One real one-step run (the tiny fault-test profile), a labelled set and a Market tree."""
    root = tmp_path_factory.mktemp("integrity")
    data = shared_images(n=24)
    prof = write_profile(root / "tiny.yaml")
    run = root / "run"
    api.pretrain(str(prof), run, data, max_steps=1)
    return {
        "run": run,
        "prof": prof,
        "images": data,
        "labelled": make_dataset(root / "labelled"),
        "market": make_market(root / "Market"),
    }


@pytest.fixture
def ck(base, tmp_path) -> checkpoint.CkptPaths:
    """A private copy of the run's newest checkpoint, free to damage."""
    shutil.copytree(base["run"] / "checkpoints", tmp_path / "run" / "checkpoints")
    found = checkpoint.newest_valid(tmp_path / "run" / "checkpoints")
    assert found is not None
    return found


def _flat(output: str) -> str:
    return "".join(output.split())  # Rich wraps long lines at the terminal width, even in paths


def _one_line_error(r, *fragments: str) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def _nothing_in(out: Path) -> bool:
    """--out left absent or empty (the run directory itself may be made before the refusal)."""
    return not out.exists() or not any(out.iterdir())


def _extract(weights: Path, out: Path):
    return runner.invoke(app, ["extract", str(weights), "-o", str(out)])


def _eval(cmd: str, weights: Path, data: Path, out: Path):
    sets = [a for s in tiny_sets() for a in ("--set", s)]
    args = [cmd, str(weights), "--data", str(data), "--out", str(out)]
    return runner.invoke(app, [*args, "--profile", "linear-demo-cpu", "--device", "cpu", *sets])


def _flip_byte(path: Path, from_end: int = 100) -> None:
    """Flip one bit in the tensor data (not the header): the file still parses as safetensors."""
    raw = bytearray(path.read_bytes())
    raw[-from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def _poison(ck: checkpoint.CkptPaths) -> None:
    """Write NaN and inf into the online backbone, then re-sign the manifest so it verifies."""
    tensors, meta = checkpoint.load_safetensors(ck.weights)
    tensors["online.backbone.conv1.weight"][0, 0, 0, :2] = float("nan")
    tensors["online.backbone.layer4.1.bn2.running_var"][3] = float("inf")
    save_file(tensors, str(ck.weights), metadata=meta)
    manifest = json.loads(ck.manifest.read_text())
    manifest["files"][ck.weights.name] = checkpoint.sha256_file(ck.weights)
    ck.manifest.write_text(json.dumps(manifest))
    assert checkpoint.verify(ck) == (True, "ok")


# ----------------------------------------------------------------- manifest verification
def test_corrupt_weights_refused_by_extract_knn_and_linear(ck, base, tmp_path):
    _flip_byte(ck.weights)
    said = [MISMATCH.format(ck.manifest.name), PICK, str(ck.weights)]
    out = tmp_path / "bb.safetensors"
    _one_line_error(_extract(ck.weights, out), *said)
    assert not out.exists() and not list(tmp_path.glob(".bb.safetensors*"))
    for cmd in ("knn-eval", "linear-eval"):
        r = _eval(cmd, ck.weights, base["labelled"], tmp_path / cmd)
        _one_line_error(r, *said)
        assert not (tmp_path / cmd).exists(), cmd  # refused before the run directory is made


def test_truncated_weights_and_corrupt_train_state_refused(ck, tmp_path):
    state = ck.state.read_bytes()
    ck.state.write_bytes(state[:-1] + bytes([state[-1] ^ 0x80]))
    _one_line_error(_extract(ck.weights, tmp_path / "a.pth"), f"{ck.state} does not match")
    ck.state.write_bytes(state)
    ck.weights.write_bytes(ck.weights.read_bytes()[:-4096])
    _one_line_error(_extract(ck.weights, tmp_path / "b.pth"), f"{ck.weights} does not match")
    assert not list(tmp_path.glob("*.pth"))


def test_unreadable_manifest_refused(ck, tmp_path):
    ck.manifest.write_text('{"files": ')  # torn
    r = _extract(ck.weights, tmp_path / "o.pth")
    _one_line_error(r, f"{ck.manifest}: malformed manifest (not JSON)", PICK)


def test_missing_manifest_warns_once_and_proceeds(ck, tmp_path):
    ck.manifest.unlink()
    r = _extract(ck.weights, tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.output
    assert _flat(r.output).count(_flat(f"warning: {ck.weights}: {NO_MANIFEST}")) == 1, r.output
    assert (tmp_path / "o.safetensors").is_file()
    again = _extract(ck.weights, tmp_path / "o2.safetensors")  # same process: said already
    assert again.exit_code == 0 and _flat(NO_MANIFEST) not in _flat(again.output), again.output


def test_files_without_manifests_pass_silently(ck, tmp_path):
    """An extracted backbone and a torchvision .pth are not sslctl checkpoints: no manifest is
    expected beside them, so no warning either; a run directory verifies while resolving."""
    bb = tmp_path / "bb.safetensors"
    assert _extract(ck.weights, bb).exit_code == 0
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "tv.pth")
    run = ck.weights.parent.parent
    for src in (bb, tmp_path / "tv.pth", run, run / "checkpoints" / "last"):
        r = _extract(src, tmp_path / "x.pth")
        assert r.exit_code == 0 and "warning" not in r.output, (src, r.output)


def test_verify_explicit_directly(ck, tmp_path):
    checkpoint.verify_explicit(ck.weights)
    checkpoint.verify_explicit(ck.state)  # pretrain --resume may name the train state
    checkpoint.verify_explicit(tmp_path / "not_a_checkpoint.safetensors")
    _flip_byte(ck.state)
    for given in (ck.weights, ck.state):
        with pytest.raises(UserError, match="state.pt does not match its manifest"):
            checkpoint.verify_explicit(given)


# ----------------------------------------------------------------- non-finite weights
def test_nan_checkpoint_refused_by_extract_and_knn(ck, base, tmp_path):
    _poison(ck)
    said = f"{ck.weights}: the weights contain 3 non-finite values (tensor conv1.weight)"
    out = tmp_path / "bb.safetensors"
    line = _one_line_error(_extract(ck.weights, out), said)
    assert "disk problem" not in line and not out.exists()
    r = _eval("knn-eval", ck.weights, base["labelled"], tmp_path / "k")
    _one_line_error(r, said)
    assert not (tmp_path / "k").exists()
    # the target network holds no NaN: it stays readable
    target = runner.invoke(app, ["extract", str(ck.weights), "-o", str(out), "--part", "target"])
    assert target.exit_code == 0, target.output
    assert read_backbone(out).state  # and what was written is finite


def test_nan_extracted_backbone_refused_by_linear_eval_and_eval_reid(base, tmp_path):
    state = build_backbone("resnet18", small_stem=True).state_dict()
    state["layer1.0.bn1.weight"][0] = float("-inf")
    bb = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bb))
    said = f"{bb}: the weights contain 1 non-finite values (tensor layer1.0.bn1.weight)"
    _one_line_error(_eval("linear-eval", bb, base["labelled"], tmp_path / "lin"), said)
    reid = ["eval-reid", str(bb), "--data", str(base["market"]), "--layout", "market1501"]
    r = runner.invoke(
        app, [*reid, "--out", str(tmp_path / "reid"), "--workers", "0", "--device", "cpu"]
    )
    _one_line_error(r, said)
    assert not (tmp_path / "reid" / "results.json").exists()


def test_init_weights_nan_or_corrupt_refused(ck, base, tmp_path):
    bb = tmp_path / "init.safetensors"
    assert _extract(ck.weights, bb).exit_code == 0
    tensors, meta = checkpoint.load_safetensors(bb)
    tensors["bn1.bias"][0] = float("nan")
    save_file(tensors, str(bb), metadata=meta)
    args = ["pretrain", "--profile", str(base["prof"]), "--data", str(base["images"])]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--set", f"init.weights={bb}"])
    _one_line_error(r, f"{bb}: the weights contain 1 non-finite values (tensor bn1.bias)")
    assert _nothing_in(tmp_path / "a")
    _flip_byte(ck.weights)
    r = runner.invoke(
        app, [*args, "--out", str(tmp_path / "b"), "--set", f"init.weights={ck.weights}"]
    )
    _one_line_error(r, MISMATCH.format(ck.manifest.name))
    assert _nothing_in(tmp_path / "b")


def test_extract_readback_compares_bits_not_values(tmp_path):
    """NaN != NaN once made extract's read-back check blame the disk for NaN weights."""
    state = build_backbone("resnet18", small_stem=True).state_dict()
    state["conv1.weight"].fill_(float("nan"))
    ex.write(tmp_path / "nan.safetensors", ex.as_torchvision(state, "test"), "safetensors", {})
    assert (
        checkpoint.load_safetensors(tmp_path / "nan.safetensors")[0]["conv1.weight"].isnan().all()
    )


def test_knn_temperature_flag_non_finite_refused(base, tmp_path):
    args = ["knn-eval", "w.safetensors", "--data", str(base["labelled"]), "--temperature", "inf"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "k")])
    assert _one_line_error(r) == "error: --temperature: inf is not a finite number"


def test_check_finite_counts_all_and_names_the_first():
    t = {
        "a": torch.zeros(3),
        "steps": torch.tensor(7),  # integers cannot hold NaN: skipped
        "b": torch.tensor([float("inf"), 1.0, float("nan")], dtype=torch.bfloat16),
        "c": torch.full((2, 2), float("-inf"), dtype=torch.float16),
    }
    with pytest.raises(UserError) as e:
        checkpoint.check_finite(t, "w.pth")
    assert str(e.value) == "w.pth: the weights contain 6 non-finite values (tensor b)"
    checkpoint.check_finite({"a": torch.ones(2), "n": torch.tensor(1)}, "ok")
    checkpoint.check_finite({}, "empty")


# ----------------------------------------------------------------- non-finite config numbers
def _float_keys(cls: type) -> list[str]:
    out = []
    for sec in dataclasses.fields(cls):
        sec_type = typing.get_type_hints(cls)[sec.name]
        if dataclasses.is_dataclass(sec_type):
            hints = typing.get_type_hints(sec_type)
            out += [
                f"{sec.name}.{f.name}"
                for f in dataclasses.fields(sec_type)
                if hints[f.name] is float
            ]
    return out


@pytest.mark.parametrize("text", [".inf", "nan", "-.inf", ".NaN", "inf", "1e999"])
def test_set_non_finite_refused(text):
    with pytest.raises(UserError) as e:
        config.load("demo-cpu", [f"optim.lr={text}"])
    assert str(e.value) == f"--set optim.lr: {text} is not a finite number"


def test_every_float_field_of_both_configs_refuses_nan():
    pre, lin = _float_keys(config.Config), _float_keys(config.LinearConfig)
    assert "optim.lr" in pre and "loss.margin" in pre and "knn.temperature" in lin
    for load, profile, keys in (
        (config.load, "demo-cpu", pre),
        (config.load_linear, "linear-r50", lin),
    ):
        for key in keys:
            with pytest.raises(UserError, match=f"^--set {key}: .nan is not a finite number$"):
                load(profile, [f"{key}=.nan"])


def test_yaml_non_finite_refused(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(UserError) as e:
        config.load(str(p))
    assert str(e.value) == f"{p}: key 'optim.lr': nan is not a finite number"
    p.write_text("kind: linear-eval\ncached:\n  lr: -.inf\n")
    with pytest.raises(UserError, match=r"mine\.yaml: key 'cached\.lr': -inf is not a finite"):
        config.load_linear(str(p))


def test_cli_pretrain_with_infinite_lr_writes_nothing(base, tmp_path):
    out = tmp_path / "out"
    args = ["pretrain", "--profile", str(base["prof"]), "--data", str(base["images"])]
    r = runner.invoke(app, [*args, "--out", str(out), "--set", "optim.lr=.inf"])
    assert _one_line_error(r) == "error: --set optim.lr: .inf is not a finite number"
    assert _nothing_in(out)
