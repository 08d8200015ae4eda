"""What linear-eval, knn-eval and extract do with their inputs, as a user sees it: --device
checked first, --trust-pickle on every weights-reading command, a run evaluated at the size it
was trained at, a linear-eval --out continued or refused by name, a corrupt run explained,
and CLI modules that import without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslctl import UserError, checkpoint, config
from sslctl.backbones import build_backbone
from sslctl.cli.app import app
from sslctl.convert.weights import read_backbone
from sslctl.eval import features
from sslctl.eval.frozen import FrozenBackbone, match_training
from tests.linear_helpers import make_dataset, make_run, make_weights, tiny_sets
from tests.trust_helpers import booby_trapped

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evalin")
    data = make_dataset(d / "data", train=8, val=3)  # 24 train, 9 val images (16 px)
    return {
        "data": data,
        "convnet4": make_weights(d / "c4.safetensors", arch="convnet4"),
        "run32": make_run(d / "run32", data / "train", image_size=32),
    }


def sslctl(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sslctl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def one_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, one ``error:`` line under 300 characters holding every fragment."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert len(line) < 300, (len(line), line)
    for f in fragments:
        assert f in line, (f, line)
    return line


def _cpu_tiny(*extra: str) -> list[str]:
    sets = [a for s in tiny_sets(*extra) for a in ("--set", s)]
    return ["--profile", "linear-demo-cpu", "--device", "cpu", *sets]


# ----------------------------------------------------------------- 1. --device, checked first
DEVICES = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("command", ["linear-eval", "knn-eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_is_checked_before_any_work(base, tmp_path, command, device):
    out = tmp_path / "out"
    p = sslctl(command, str(base["convnet4"]), "--data", str(base["data"]), "--out", str(out),
               "--device", device)  # fmt: skip
    one_error(p, "--device", device)
    assert not out.exists()  # no run folder, no features cache


# ----------------------------------------------------------------- 2. --trust-pickle


@pytest.mark.parametrize("command", ["linear-eval", "knn-eval"])
def test_pickle_refusal_names_the_option_each_command_has(base, tmp_path, command):
    evil, marker = booby_trapped(tmp_path)
    out = tmp_path / "out"
    p = sslctl(
        command, str(evil), "--data", str(base["data"]), "--out", str(out), "--device", "cpu"
    )
    line = one_error(p, str(evil), "refused", "references", "pass --trust-pickle")
    assert not marker.exists() and not out.exists(), line


@pytest.mark.parametrize("command", ["linear-eval", "knn-eval", "extract"])
def test_every_weights_reading_command_offers_trust_pickle(command):
    r = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0 and "--trust-pickle" in r.output, r.output
    assert "only for files whose author you trust" in " ".join(r.output.split())


def test_knn_eval_trust_pickle_warns_then_evaluates(base, tmp_path):
    evil, marker = booby_trapped(tmp_path)
    r = runner.invoke(app, ["knn-eval", str(evil), "--data", str(base["data"]), "--out",
                            str(tmp_path / "k"), *_cpu_tiny(), "--trust-pickle"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert marker.exists() and "--trust-pickle: unpickling" in " ".join(r.output.split())
    assert json.loads((tmp_path / "k" / "results.json").read_text())["arch"] == "resnet18"


def test_commands_without_the_option_point_at_extract(tmp_path):
    """convert-detectron and init.weights read weights without a --trust-pickle of their own:
    their refusal names the command that has one."""
    evil, _ = booby_trapped(tmp_path)
    with pytest.raises(UserError, match=r"sslctl extract … --trust-pickle"):
        read_backbone(evil)


# ----------------------------------------------------------------- 3. the size a run was trained at
@pytest.mark.slow  # a whole evaluation in a subprocess
def test_knn_eval_of_a_run_uses_its_training_size(base, tmp_path):
    out = tmp_path / "k"
    p = sslctl(
        "knn-eval",
        str(base["run32"]),
        "--data",
        str(base["data"]),
        "--out",
        str(out),
        "--k",
        "3",
        "--device",
        "cpu",
    )  # default profile linear-r50: 224 px, 8 workers
    assert p.returncode == 0, p.stderr[-3000:]
    said = " ".join(p.stderr.split())
    assert f"evaluating at 32 px, the size {base['run32']} was trained at (from its config)" in said
    res = json.loads((out / "results.json").read_text())
    assert (res["image_size"], res["resize"]) == (32, 37)  # linear-r50's 256/224 ratio kept
    assert res["from_training_config"] == {"data.image_size": 32, "data.resize": 37}


def test_explicit_settings_win_over_the_training_size(base, tmp_path):
    args = [
        "--data",
        str(base["data"]),
        "--out",
        str(tmp_path / "k"),
        "--k",
        "3",
        "--device",
        "cpu",
    ]
    r = runner.invoke(app, ["knn-eval", str(base["run32"]), *args,
                            "--set", "data.image_size=16", "--set", "data.resize=16"])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "k" / "results.json").read_text())
    assert res["image_size"] == 16 and "from_training_config" not in res
    assert "was trained at 32 px; evaluating at 16 px" in " ".join(r.output.split())


def test_linear_eval_cached_of_a_run_uses_its_training_size(base, tmp_path):
    sets = ["cached.epochs=2", "cached.batch_size=8", "cached.warmup_epochs=1", "knn.k=3"]
    r = runner.invoke(app, ["linear-eval", str(base["run32"]), "--data", str(base["data"]),
                            "--out", str(tmp_path / "l"), "--protocol", "cached", "--device", "cpu",
                            *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "l" / "results.json").read_text())
    assert res["config"]["data"]["image_size"] == 32 and res["profile"] == "linear-r50"


def test_training_size_is_taken_unless_a_size_is_chosen():
    """The pre-training size is taken under the default profile (named or not); a profile other
    than the default, or --set data.image_size / data.resize, keeps the profile's size."""
    cfg = config.load_linear("linear-r50", [])
    bb = FrozenBackbone(
        torch.nn.Identity(), "convnet4", False, "d", "RUN", {"data": {"image_size": 64}}
    )
    for profile in (None, "linear-r50"):
        m = match_training(cfg, profile, None, (), bb)
        assert (m.cfg.data.image_size, m.cfg.data.resize) == (64, 73)
        assert m.taken == {"data.image_size": 64, "data.resize": 73}
    for profile, sets in [("linear-demo-cpu", ()), (None, ("data.resize=300",))]:
        m = match_training(cfg, profile, None, sets, bb)
        assert m.taken == {} and m.cfg == cfg


def test_loader_workers_are_capped_at_the_cpus(monkeypatch):
    monkeypatch.setattr(features, "available_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [features.loader_workers(n) for n in (0, 1, 8)] == [0, 1, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the two CPUs
    assert features.loader_workers(8) == 1


# ----------------------------------------------------------------- 4. continuing a linear-eval --out
@pytest.mark.slow  # a whole evaluation in a subprocess
def test_linear_eval_continues_to_more_epochs_and_names_changed_settings(base, tmp_path):
    out = tmp_path / "lin"
    args = ["linear-eval", str(base["convnet4"]), "--data", str(base["data"]), "--out", str(out)]
    first = runner.invoke(app, [*args, *_cpu_tiny()])  # linear.epochs=2
    assert first.exit_code == 0, first.output
    more = runner.invoke(app, [*args, *_cpu_tiny("linear.epochs=3")])
    assert more.exit_code == 0, more.output
    assert "continuing to 3 epochs (it was started for 2)" in " ".join(more.output.split())
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 3 and [h["epoch"] for h in res["history"]] == [1.0, 2.0, 3.0]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))  # 3 an epoch, none twice
    p = sslctl(*args, *_cpu_tiny("linear.epochs=3", "linear.lr=0.5"))
    one_error(p, str(out), "linear.lr 0.1 → 0.5", "--fresh", "--out")
    again = runner.invoke(app, [*args, "--fresh", *_cpu_tiny("linear.lr=0.5")])
    assert again.exit_code == 0, again.output
    moved = list((out / "superseded").iterdir())
    assert len(moved) == 1 and (moved[0] / "checkpoints").is_dir()
    assert (moved[0] / "results.json").is_file()
    assert json.loads((out / "results.json").read_text())["config"]["linear"]["lr"] == 0.5


# ----------------------------------------------------------------- 5. a run whose checkpoint is corrupt
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _save(ckdir: Path, step: int, seed: int = 1) -> checkpoint.CkptPaths:
    """A checkpoint of a convnet4 online backbone, as a run writes it (manifest included)."""
    torch.manual_seed(seed)
    state = build_backbone("convnet4").state_dict()
    t = {f"online.backbone.{k}": v for k, v in state.items()}
    return checkpoint.save(ckdir, step, t, {"method": "triplet"}, {"step": step})


@pytest.mark.slow
def test_extract_says_why_no_checkpoint_of_a_run_verifies(tmp_path):
    run = tmp_path / "run"
    ck = _save(run / "checkpoints", 10)
    _flip_last_byte(ck.weights)
    p = sslctl("extract", str(run), "-o", str(tmp_path / "o.safetensors"))
    one_error(p, str(run), "step 10", "does not match its sha256", "sslctl checkpoints")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoints", 5)
    _flip_last_byte(_save(run / "checkpoints", 10, seed=2).weights)
    r = runner.invoke(app, ["extract", str(run), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "the newest checkpoint, step 10, does not verify" in flat and "using step 5" in flat
    assert "step 5, from" in flat  # what extract reports having read


# ----------------------------------------------------------------- 6. CLI modules without torch
def test_cli_modules_import_without_torch():
    code = (
        "import sys, sslctl.cli.linear_eval, sslctl.cli.knn_eval, sslctl.cli.extract; "
        "print('torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr


def test_eval_list_files_outside_the_root_need_allow_outside_root(tmp_path):
    """--train/--val list files follow the same rule as pre-training's: an entry outside the
    data root is refused unless the linear-eval profile's data.allow_outside_root is true."""
    from PIL import Image

    from sslctl import UserError
    from sslctl.eval.splits import resolve_splits

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(elsewhere / f"{i}.png")
        Image.new("RGB", (8, 8), (0, i * 90, 0)).save(root / f"{i}.png")
    (root / "train.txt").write_text("".join(f"../elsewhere/{i}.png {i}\n" for i in range(2)))
    (root / "val.txt").write_text("".join(f"{i}.png {i}\n" for i in range(2)))
    lists = dict(train=root / "train.txt", val=root / "val.txt")
    with pytest.raises(UserError, match="outside the data root"):
        resolve_splits(root, **lists)
    splits = resolve_splits(root, **lists, allow_outside_root=True)
    assert len(splits.train) == 2 and splits.num_classes == 2


def test_keys_added_later_at_their_default_are_no_change_for_linear_runs():
    """A linear-eval run saved before a key existed (here linear.final_lr_factor, data limits)
    continues when the key is at the linear-eval default; another value is a change."""
    import json

    from sslctl import config
    from sslctl.eval.linear import settings_changes

    new = config.LinearConfig().to_dict()
    old = json.loads(json.dumps(new))
    for section, key in [("linear", "final_lr_factor"), ("data", "max_image_pixels")]:
        del old[section][key]
    del old["data"]["allow_outside_root"]
    assert settings_changes(json.dumps(old), new) == {}
    new["linear"]["final_lr_factor"] = 0.5
    assert settings_changes(json.dumps(old), new) == {"linear.final_lr_factor": [None, 0.5]}
