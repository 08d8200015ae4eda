"""extract: checkpoints → torchvision-loadable backbones (SPEC §4)."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchvision import models
from typer.testing import CliRunner

from sslctl import UserError, api, checkpoint
from sslctl.backbones import build_backbone, torchvision_resnet
from sslctl.cli.app import app
from sslctl.convert import extract as ex

TORCHVISION = {"resnet18": models.resnet18, "resnet50": models.resnet50}


def _trained_pair(arch: str, small_stem: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An online backbone after 3 SGD steps on random data, and its untouched copy as target."""
    torch.manual_seed(0)
    online = build_backbone(arch, small_stem)
    target = copy.deepcopy(online)
    opt = torch.optim.SGD(online.parameters(), lr=0.5)
    for _ in range(3):
        loss = online(torch.randn(4, 3, 16, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return online.eval(), target.eval()


def _save_run(run: Path, arch: str, online, target, step: int = 30) -> checkpoint.CkptPaths:
    t = {f"online.backbone.{k}": v for k, v in online.state_dict().items()}
    t |= {f"target.backbone.{k}": v for k, v in target.state_dict().items()}
    t |= {"online.projector.0.weight": torch.randn(8, 4), "predictor.0.weight": torch.randn(4, 4)}
    t |= {"target.projector.0.weight": torch.randn(8, 4)}
    meta = {"method": "triplet", "arch": arch, "small_stem": "false"}
    return checkpoint.save(run / "checkpoints", step, t, meta, {"step": step, "epoch": 1})


def _features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


def _torchvision_features(arch: str, state: dict, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    net = TORCHVISION[arch]()
    result = net.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    net.fc = torch.nn.Identity()
    return _features(net, x), sorted(result.missing_keys)


@pytest.fixture(scope="module")
def r18_pair():
    return _trained_pair("resnet18")


@pytest.fixture(scope="module")
def r50_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("r50") / "run"
    online, target = _trained_pair("resnet50")
    _save_run(run, "resnet50", online, target)
    return run, online, target


@pytest.mark.parametrize("part", ["online", "target"])
def test_r50_round_trip_safetensors(r50_run, tmp_path, part):
    run, online, target = r50_run
    out = tmp_path / "r50_backbone.safetensors"
    res = api.extract(run / "checkpoints" / "last", out, part=part)
    assert res.arch == "resnet50" and res.format == "safetensors" and res.step == "30"
    state, meta = checkpoint.load_safetensors(out)
    x = torch.randn(2, 3, 32, 32)
    feats, missing = _torchvision_features("resnet50", state, x)
    assert missing == ["fc.bias", "fc.weight"]
    want, other = (online, target) if part == "online" else (target, online)
    assert torch.equal(feats, _features(want, x))
    assert not torch.allclose(feats, _features(other, x))  # the SGD steps made them differ
    assert meta["format"] == "sslctl-backbone" and meta["source_kind"] == "sslctl-checkpoint"
    assert meta["method"] == "triplet" and meta["arch"] == "resnet50" and meta["step"] == "30"
    assert meta["source"].endswith("step_00000030.safetensors") and meta["part"] == part
    assert all(isinstance(v, str) for v in meta.values())
    assert not any(k.startswith("fc.") for k in state)


def test_r18_torchvision_pth_from_run_dir(tmp_path, r18_pair):
    online, target = r18_pair
    _save_run(tmp_path / "run", "resnet18", online, target)
    out = tmp_path / "r18.pth"
    res = api.extract(tmp_path / "run", out, fmt="torchvision")
    state = torch.load(out, weights_only=True)
    assert res.arch == "resnet18" and res.format == "torchvision"
    assert set(state) == set(online.state_dict())  # every buffer, counters included; no fc
    x = torch.randn(2, 3, 32, 32)
    feats, missing = _torchvision_features("resnet18", state, x)
    assert missing == ["fc.bias", "fc.weight"] and torch.equal(feats, _features(online, x))


def test_newest_valid_checkpoint_is_used(tmp_path, r18_pair):
    online, target = r18_pair
    _save_run(tmp_path / "run", "resnet18", target, copy.deepcopy(target), step=10)
    newest = _save_run(tmp_path / "run", "resnet18", online, target, step=20)
    torn = _save_run(tmp_path / "run", "resnet18", target, copy.deepcopy(target), step=30)
    torn.manifest.unlink()
    res = api.extract(tmp_path / "run", tmp_path / "o.safetensors")
    assert res.source == str(newest.weights) and res.step == "20"


def test_small_stem_backbone(tmp_path):
    online, target = _trained_pair("resnet18", small_stem=True)
    _save_run(tmp_path / "run", "resnet18", online, target)
    res = api.extract(tmp_path / "run", tmp_path / "s.safetensors")
    state, meta = checkpoint.load_safetensors(tmp_path / "s.safetensors")
    assert res.small_stem and meta["small_stem"] == "true"
    net = torchvision_resnet("resnet18", small_stem=True)
    assert sorted(net.load_state_dict(state, strict=False).missing_keys) == ["fc.bias", "fc.weight"]


def _reference_pth(path: Path, online, target, extra_meta: dict | None = None) -> None:
    """The reference's layout: mmcv ``meta`` and ``state_dict`` with online/target/backbone."""
    sd = {}
    for k, v in online.state_dict().items():
        sd[f"online_net.0.{k}"] = v
        sd[f"backbone.{k}"] = v
    for k, v in target.state_dict().items():
        sd[f"target_net.0.{k}"] = v
    sd["online_net.1.mlp.0.weight"] = torch.randn(16, 512)
    sd["target_net.1.mlp.0.weight"] = torch.randn(16, 512)
    sd["head.predictor.mlp.0.weight"] = torch.randn(16, 16)
    meta = {"epoch": 940, "iter": 117500, "mmcv_version": "1.0.0", **(extra_meta or {})}
    torch.save({"meta": meta, "state_dict": sd}, path)


@pytest.mark.parametrize("part", ["online", "target"])
def test_reference_pth(tmp_path, part, r18_pair):
    online, target = r18_pair
    _reference_pth(tmp_path / "release_ep940.pth", online, target)
    out = tmp_path / "r.safetensors"
    res = api.extract(tmp_path / "release_ep940.pth", out, part=part)
    state, meta = checkpoint.load_safetensors(out)
    want = (online if part == "online" else target).state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    # mmcv's iter counts micro-iterations; with no saved config the optimizer step is unknown.
    assert res.source_kind == "reference-mmcv" and meta["step"] == res.step == "unknown"


# The reference's accumulating config as mmcv saves it in a checkpoint's meta["config"]: the
# file's path on a line of its own, then its text (an excerpt of
# configs/selfsup/triplet/r50_bs4096_accumulate4_ep1000_fp16_triplet_gpu3090.py).
_ACCUMULATE4 = """configs/selfsup/triplet/r50_bs4096_accumulate4_ep1000_fp16_triplet_gpu3090.py
_base_ = '../../base.py'
use_fp16 = True
update_interval = 4  # interval for accumulate gradient
custom_hooks = [
    dict(type='TripletHook', end_momentum=1., update_interval=update_interval)
]
optimizer = dict(type='LARS', lr=4.8, weight_decay=0.000001, momentum=0.9)
optimizer_config = dict(update_interval=update_interval, use_fp16=use_fp16)
total_epochs = 1000
"""


@pytest.mark.parametrize(
    ("config", "step", "report"),
    [
        (_ACCUMULATE4, "29375", "update_interval 4 makes that 29375 optimizer steps"),
        # DistOptimizerHook's default interval is 1: every micro-iteration is a step.
        ("optimizer_config = dict()  # grad_clip, coalesce", "117500", "117500 optimizer steps"),
        ("/abs/base.py\noptimizer_config = {'update_interval': 6}", "19583", "interval 6"),
        (None, "unknown", "not optimizer steps; no saved config gives update_interval"),
        ("optimizer_config = dict(update_interval=", "unknown", "step unknown"),  # unparsable
        ("optimizer_config = dict(update_interval=n)", "unknown", "step unknown"),  # n undefined
        ("lr = 0.1", "unknown", "step unknown"),  # no optimizer_config
    ],
)
def test_reference_meta_iter_is_micro_iterations(tmp_path, r18_pair, capsys, config, step, report):
    online, target = r18_pair
    extra = {} if config is None else {"config": config}
    _reference_pth(tmp_path / "ref.pth", online, target, extra_meta=extra)
    out = tmp_path / "r.safetensors"
    res = api.extract(tmp_path / "ref.pth", out)
    assert res.step == step and checkpoint.load_safetensors(out)[1]["step"] == step
    err = " ".join(capsys.readouterr().err.split())
    assert "mmcv meta iter 117500 counts micro-iterations" in err and report in err


def test_plain_torchvision_state_dict_with_fc(tmp_path):
    net = models.resnet18()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    api.extract(tmp_path / "tv.pth", tmp_path / "o.safetensors")
    state, meta = checkpoint.load_safetensors(tmp_path / "o.safetensors")
    want = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert meta["source_kind"] == "torchvision" and meta["method"] == "unknown"


def test_missing_bn_counters_are_added_as_zero(tmp_path):
    sd = {k: v for k, v in models.resnet18().state_dict().items() if "num_batches" not in k}
    torch.save(sd, tmp_path / "old.pth")
    res = api.extract(tmp_path / "old.pth", tmp_path / "o.pth")
    state = torch.load(tmp_path / "o.pth", weights_only=True)
    assert res.counters_added == 20 and state["layer4.1.bn2.num_batches_tracked"].item() == 0


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code in a .pth."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_without_running(tmp_path):
    net = models.resnet18()
    payload = {"state_dict": net.state_dict(), "extra": _Payload(tmp_path / "marker")}
    torch.save(payload, tmp_path / "evil.pth")
    out = tmp_path / "o.safetensors"
    with pytest.raises(UserError, match=r"refused.*references io\.open"):
        api.extract(tmp_path / "evil.pth", out)
    assert not (tmp_path / "marker").exists() and not out.exists()
    # The payload is live: an unsafe load would have run it.
    torch.save({"x": _Payload(tmp_path / "proof")}, tmp_path / "evil2.pth")
    torch.load(tmp_path / "evil2.pth", weights_only=False)["x"].close()
    assert (tmp_path / "proof").exists()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name → (input file, a regex its error line must match)."""
    (tmp_path / "notes.pth").write_text("this is not a checkpoint\n")
    good = tmp_path / "good.pth"
    torch.save(models.resnet18().state_dict(), good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:5000])
    net = build_backbone("resnet18")
    st = tmp_path / "step_00000001.safetensors"
    checkpoint.save_safetensors(
        st, {f"online.backbone.{k}": v for k, v in net.state_dict().items()}, {}
    )
    (tmp_path / "trunc.safetensors").write_bytes(st.read_bytes()[:3000])
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg.pth")
    odd = {k: v for k, v in models.resnet18().state_dict().items() if not k.startswith("layer3.1")}
    torch.save(odd, tmp_path / "odd.pth")
    torch.save({"state_dict": {"head.fc.weight": torch.zeros(3)}}, tmp_path / "headonly.pth")
    checkpoint.save_safetensors(
        tmp_path / "proj.safetensors", {"online.projector.w": torch.zeros(2)}, {}
    )
    return {
        "not a checkpoint": (tmp_path / "notes.pth", "not a PyTorch weights file"),
        "truncated pth": (tmp_path / "truncated.pth", "not a readable PyTorch weights file"),
        "truncated safetensors": (tmp_path / "trunc.safetensors", "not a readable safetensors"),
        "wrong architecture": (tmp_path / "vgg.pth", "no backbone inside"),
        "wrong block layout": (tmp_path / "odd.pth", "unsupported ResNet layout"),
        "no backbone inside": (tmp_path / "headonly.pth", "no backbone inside"),
        "only a projector": (tmp_path / "proj.safetensors", r"no .online\.backbone\.\*. tensors"),
        "missing input": (tmp_path / "absent.pth", "no such file"),
    }


def test_bad_inputs_raise_user_error_and_write_nothing(tmp_path):
    for name, (path, pattern) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / "o.safetensors"
        with pytest.raises(UserError, match=pattern):
            api.extract(path, out)
        assert not (tmp_path / "out").exists(), name


def test_failed_check_leaves_no_output(tmp_path, monkeypatch):
    torch.save(models.resnet18().state_dict(), tmp_path / "tv.pth")

    def broken(*args):
        raise UserError("simulated failure after the bytes were written")

    monkeypatch.setattr(ex, "check_loads", broken)
    with pytest.raises(UserError, match="simulated"):
        api.extract(tmp_path / "tv.pth", tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.pth"]  # no output, no temp file


def test_format_and_output_checks(tmp_path):
    torch.save(models.resnet18().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(UserError, match="suffix .safetensors says safetensors"):
        api.extract(tmp_path / "tv.pth", tmp_path / "o.safetensors", fmt="torchvision")
    with pytest.raises(UserError, match="cannot tell the format"):
        api.extract(tmp_path / "tv.pth", tmp_path / "o.bin")
    with pytest.raises(UserError, match="is the input file"):
        api.extract(tmp_path / "tv.pth", tmp_path / "tv.pth")
    with pytest.raises(UserError, match="--part"):
        api.extract(tmp_path / "tv.pth", tmp_path / "o.pth", part="momentum")
    with pytest.raises(UserError, match="no target network"):
        api.extract(tmp_path / "tv.pth", tmp_path / "o.pth", part="target")
    res = api.extract(tmp_path / "tv.pth", tmp_path / "o.bin", fmt="safetensors")
    with safe_open(str(res.output), framework="pt") as f:
        assert f.metadata()["format"] == "sslctl-backbone"
    umask = os.umask(0)
    os.umask(umask)
    assert res.output.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600


def _one_line(text: str) -> bool:
    return len([ln for ln in text.splitlines() if ln.strip()]) == 1 and "Traceback" not in text


def test_cli_extract(tmp_path):
    torch.save(models.resnet18().state_dict(), tmp_path / "tv.pth")
    runner = CliRunner()
    ok = runner.invoke(app, ["extract", str(tmp_path / "tv.pth"), "-o", str(tmp_path / "o.pth")])
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and "only fc.weight, fc.bias missing" in ok.output
    for name, (path, pattern) in _bad_inputs(tmp_path).items():
        out = tmp_path / "bad.safetensors"
        r = runner.invoke(app, ["extract", str(path), "-o", str(out)])
        assert r.exit_code == 2 and _one_line(r.output), (name, r.output)
        assert re.search(pattern, " ".join(r.output.split())), (name, r.output)
        assert not out.exists(), name


def test_subprocess_bad_input(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    out = tmp_path / "o.safetensors"
    cmd = [sys.executable, "-m", "sslctl", "extract", str(tmp_path / "notes.pth"), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert _one_line(p.stderr) and "not a PyTorch weights file" in p.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "notes.pth"]
