"""Profile inputs a user can get wrong or a hostile file can abuse: YAML safety (aliases,
nesting, duplicates, size), one range per numeric key, `extends:`, and `sslctl profiles show`.

Errors are checked through the library and, where a user sees them, through the real CLI in a
subprocess: exit code 2, one line under 300 characters naming the thing, never a traceback."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from sslctl import UserError, config

ROOT = Path(__file__).resolve().parents[1]
# the minimum a pre-training profile of one's own names (config.REQUIRED)
BASE = "method: {name: triplet}\nmodel: {arch: resnet18}\n"


def sslctl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sslctl", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI's error line, after checking the convention (exit 2, one short line)."""
    both = r.stdout + r.stderr
    assert r.returncode == 2, both[-2000:]
    assert "Traceback" not in both, both[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    msg = lines[0].removeprefix("error: ")
    assert len(msg) < 300, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def load_error(tmp_path: Path, text: str, *sets: str) -> str:
    p = tmp_path / "mine.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(str(p), list(sets))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300 and "mine.yaml" in msg, msg
    return msg


# ----------------------------------------------------------------- 1. YAML safety
def billion_laughs() -> str:
    """9 levels of 9 aliases each: ~4·10⁸ strings once expanded, 700 bytes on disk."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\ntrain: {epochs: *l9}\n"


def test_alias_bomb_refused_quickly(tmp_path: Path):
    start = time.monotonic()
    msg = load_error(tmp_path, BASE + billion_laughs())
    assert time.monotonic() - start < 5
    assert "line 4: YAML aliases (*name) are not allowed" in msg and "extends:" in msg


def test_any_alias_refused_with_its_line(tmp_path: Path):
    msg = load_error(tmp_path, BASE + "optim:\n  lr: &x 0.1\n  min_lr: *x\n")
    assert "line 5: YAML aliases" in msg


def test_cli_alias_bomb_is_one_line(tmp_path: Path):
    p = tmp_path / "bomb.yaml"
    p.write_text(billion_laughs())
    one_line_error(sslctl("profiles", "show", str(p)), "bomb.yaml", "aliases")


def test_deep_nesting_refused_without_recursion_error(tmp_path: Path):
    deep = "[" * 100_000
    msg = load_error(tmp_path, BASE + f"train: {{epochs: {deep}{']' * 100_000}}}\n")
    assert "line 3: nested more than 16 levels deep" in msg
    assert "nested more than" in load_error(tmp_path, deep)  # unclosed, no mapping at all
    with pytest.raises(UserError) as e:  # the same text given to --set: a string, clipped
        config.load("demo-cpu", [f"train.epochs={deep}"])
    assert "key 'train.epochs': expected int, got str '[[[" in str(e.value)
    assert len(str(e.value)) < 300


def test_cli_deep_nesting_is_one_line(tmp_path: Path):
    p = tmp_path / "deep.yaml"
    p.write_text("[" * 100_000)
    one_line_error(sslctl("profiles", "show", str(p)), "deep.yaml", "nested more than")


def test_duplicate_section_and_key_name_the_line(tmp_path: Path):
    msg = load_error(tmp_path, BASE + "train: {epochs: 3}\nloss: {gamma: 1}\ntrain: {epochs: 4}\n")
    assert "line 5: duplicate key 'train' (first on line 3)" in msg
    msg = load_error(tmp_path, BASE + "train:\n  epochs: 3\n  batch_size: 12\n  epochs: 4\n")
    assert "line 6: duplicate key 'epochs' (first on line 4)" in msg
    msg = load_error(tmp_path, BASE + "train: {epochs: 3, epochs: 4}\n")
    assert "line 3: duplicate key 'epochs'" in msg


def test_cli_duplicate_key_is_one_line(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text("kind: linear-eval\nknn: {k: 5}\nknn: {k: 6}\n")
    one_line_error(sslctl("profiles", "show", str(p)), "dup.yaml", "line 3: duplicate key 'knn'")


def test_profile_size_is_capped(tmp_path: Path):
    big = BASE + "#" * config.MAX_PROFILE_BYTES + "\n"
    assert "larger than 1 MB" in load_error(tmp_path, big)
    small = BASE + "# padding\n" * 1000  # a large but sane file loads
    p = tmp_path / "ok.yaml"
    p.write_text(small)
    assert config.load(str(p)).model.arch == "resnet18"


def test_quoted_values_are_truncated(tmp_path: Path):
    long, key = "x" * 10_000, "x" * 1000  # YAML allows keys up to 1024 characters
    for text, fragment in (
        (BASE + f"data: {{backend: {long}}}\n", "key 'data.backend' must be one of"),
        (BASE + f"train: {{epochs: {long}}}\n", "key 'train.epochs': expected int"),
        (BASE + f"train: {{{key}: 1}}\n", "unknown key 'train.xxx"),
        (BASE + f"{key}: {{a: 1}}\n", "unknown section 'xxx"),
        (BASE + "train: {epochs: " + "1" * 5000 + "}\n", "cannot read profile"),
    ):
        msg = load_error(tmp_path, text)
        assert fragment in msg and (key not in msg) and len(msg) < 300, msg
    with pytest.raises(UserError) as e:
        config.load(key)
    assert "unknown profile 'xxx" in str(e.value) and len(str(e.value)) < 300


# ----------------------------------------------------------------- 2. numeric ranges
def _numeric_fields(cls: type) -> dict[str, type]:
    out = {}
    for sec in dataclasses.fields(cls):
        sec_type = typing.get_type_hints(cls)[sec.name]
        if dataclasses.is_dataclass(sec_type):
            hints = typing.get_type_hints(sec_type)
            for f in dataclasses.fields(sec_type):
                if hints[f.name] in (int, float):
                    out[f"{sec.name}.{f.name}"] = hints[f.name]
    return out


def test_every_numeric_key_has_one_range_and_defaults_fit():
    pre, lin = _numeric_fields(config.Config), _numeric_fields(config.LinearConfig)
    assert set(config.RANGES) == set(pre) | set(lin)
    for cfg in (config.Config(), config.LinearConfig()):
        for name in _numeric_fields(type(cfg)):
            sec, key = name.split(".")
            assert getattr(getattr(cfg, sec), key) in config.RANGES[name], name
    for name, (kind, _) in config.profile_table().items():  # bundled profiles keep loading
        assert isinstance(config.load_any(name), config.LinearConfig) == (kind == "linear-eval")


def test_range_semantics_and_wording():
    r = config.Range
    assert 0 in config.MOMENTUM and 1 not in config.MOMENTUM and 0.999 in config.MOMENTUM
    assert 0 not in config.POSITIVE and 1e-12 in config.POSITIVE
    assert [str(x) for x in (r(1), r(0, lo_open=True), r(0, 1, hi_open=True), r(8, 4096))] == [
        ">= 1",
        "> 0",
        "in [0, 1)",
        "in [8, 4096]",
    ]


# Every refusal of a --set names the key and, unless the --set itself is named, the profile
# with "(with --set)": pre-training (demo-cpu) and linear-eval (linear-r50) profiles alike.
LOADERS = {"demo-cpu": config.load, "linear-r50": config.load_linear}


@pytest.mark.parametrize(
    "profile, sets, message",
    [
        ("demo-cpu", ["optim.lrr=1"], "unknown key 'optim.lrr'"),
        ("demo-cpu", ["train.epochs=abc"], "key 'train.epochs': expected int"),
        ("demo-cpu", ["train.epochs=1.5"], "expected int"),
        ("demo-cpu", ["nosuch.key=1"], "unknown section 'nosuch'"),
        ("demo-cpu", ["oops"], "expected section.key=value"),
        ("demo-cpu", ["data.backend=magic"], "must be one of auto, torchvision, dali"),
        ("demo-cpu", ["train.batch_size=8"], "too small for the truncated triplet loss"),
        ("demo-cpu", ["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        ("demo-cpu", ["optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1"),
        ("demo-cpu", ["optim.momentum=1"], "optim.momentum must be in [0, 1), got 1"),
        ("demo-cpu", ["data.workers=-1"], "data.workers must be in [0, 256], got -1"),
        (
            "demo-cpu",
            ["data.image_size=100000"],
            "data.image_size must be in [8, 4096], got 100000",
        ),
        ("demo-cpu", ["train.epochs=1000000000000"], "train.epochs must be in [1, 100000]"),
        ("demo-cpu", ["train.epochs=1e12"], "key 'train.epochs': expected int, got str '1e12'"),
        ("demo-cpu", ["data.crop_scale_min=0"], "data.crop_scale_min must be in (0, 1], got 0"),
        (
            "demo-cpu",
            ["optim.warmup_start_factor=2"],
            "optim.warmup_start_factor must be in [0, 1]",
        ),
        ("demo-cpu", ["train.seed=-1"], "train.seed must be in [0, 4294967295]"),
        ("demo-cpu", ["data.max_image_pixels=0"], "data.max_image_pixels must be >= 1, got 0"),
        (
            "demo-cpu",
            ["optim.warmup_epochs=.nan"],
            "--set optim.warmup_epochs: .nan is not a finite number",
        ),
        ("demo-cpu", ["optim.momentum=.nan"], "--set optim.momentum: .nan is not a finite number"),
        ("linear-r50", ["linear.lrr=1"], "unknown key 'linear.lrr'"),
        ("linear-r50", ["linear.epochs=abc"], "key 'linear.epochs': expected int"),
        ("linear-r50", ["optim.lr=1"], "unknown section 'optim'"),
        ("linear-r50", ["linear.precision=fp8"], "must be one of fp16, bf16, fp32"),
        ("linear-r50", ["data.resize=100"], "data.resize must be >= data.image_size"),
        ("linear-r50", ["knn.temperature=0"], "knn.temperature must be > 0"),
        ("linear-r50", ["linear.momentum=-0.1"], "linear.momentum must be in [0, 1), got -0.1"),
        ("linear-r50", ["cached.weight_decay=-1"], "cached.weight_decay must be >= 0"),
        ("linear-r50", ["knn.chunk=0"], "knn.chunk must be in [1, 1048576], got 0"),
        ("linear-r50", ["data.workers=-1"], "data.workers must be in [0, 256], got -1"),
        ("linear-r50", ["linear.log_every=0"], "linear.log_every must be >= 1, got 0"),
    ],
)
def test_bad_sets_name_the_key_and_profile(profile, sets, message):
    with pytest.raises(UserError) as e:
        LOADERS[profile](profile, sets)
    msg = str(e.value)
    assert message in msg, msg
    assert msg.startswith("--set") or f"{profile}.yaml (with --set)" in msg, msg


def test_range_checked_in_yaml_too(tmp_path: Path):
    msg = load_error(tmp_path, BASE + "train: {log_every: 0}\n")
    assert msg == f"{tmp_path / 'mine.yaml'}: train.log_every must be >= 1, got 0"


def test_cross_key_rules_name_both_keys_and_values():
    with pytest.raises(UserError) as e:
        config.load_linear("linear-r50", ["linear.epochs=2"])
    assert "linear.warmup_epochs=10 must be <= linear.epochs=2; lower linear.warmup_epochs " in (
        str(e.value)
    )
    assert "--set linear.warmup_epochs=2" in str(e.value)
    with pytest.raises(UserError, match=r"cached\.warmup_epochs=5 must be <= cached\.epochs=3"):
        config.load_linear("linear-r50", ["cached.epochs=3"])
    with pytest.raises(UserError, match=r"optim\.warmup_epochs=10 must be <= train\.epochs=2"):
        config.load("r50-3090x8", ["train.epochs=2"])
    with pytest.raises(UserError, match=r"method\.online_res_min=200 must be <= .*_max=100"):
        config.load("r50-3090x8", ["method.online_res_min=200", "method.online_res_max=100"])
    # a warm-up as long as the run is allowed (the schedules accept it)
    assert config.load_linear("linear-r50", ["linear.epochs=10"]).linear.epochs == 10


@pytest.mark.slow
def test_cli_ranges_are_one_line(tmp_path: Path):
    out = tmp_path / "run"
    r = sslctl("pretrain", "--profile", "demo-cpu", "--out", str(out), "--set", "train.log_every=0")
    one_line_error(r, "demo-cpu.yaml", "train.log_every must be >= 1, got 0")
    assert not out.exists()
    r = sslctl("profiles", "show", "linear-r50", "--set", "linear.epochs=2")
    one_line_error(r, "linear-r50.yaml", "linear.warmup_epochs=10 must be <= linear.epochs=2")


# ----------------------------------------------------------------- 3. data keys
def test_data_keys_for_list_files_and_huge_images():
    for cfg in (config.load("demo-cpu"), config.load_linear("linear-r50")):
        assert cfg.data.allow_outside_root is False
        assert cfg.data.max_image_pixels == 178956970
    c = config.load("demo-cpu", ["data.allow_outside_root=true", "data.max_image_pixels=1000"])
    assert c.data.allow_outside_root is True and c.data.max_image_pixels == 1000
    with pytest.raises(UserError, match="key 'data.allow_outside_root': expected bool"):
        config.load_linear("linear-r50", ["data.allow_outside_root=maybe"])


# ----------------------------------------------------------------- 4. extends
def test_extends_a_bundled_profile_merges_key_by_key(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("extends: demo-cpu\ntrain: {epochs: 3}\n")
    mine, demo = config.load(str(p)), config.load("demo-cpu")
    assert mine.train.epochs == 3 and mine.train.batch_size == demo.train.batch_size
    assert mine.replace(train=demo.train) == demo  # everything else is demo-cpu's


def test_extends_chain_by_relative_path(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(BASE + "train: {epochs: 50, batch_size: 20}\n")
    (tmp_path / "sub" / "b.yaml").write_text("extends: ../a.yaml\ntrain: {batch_size: 30}\n")
    (tmp_path / "sub" / "c.yaml").write_text("extends: b.yaml\nloss: {gamma: 1}\n")
    c = config.load(str(tmp_path / "sub" / "c.yaml"))
    assert (c.train.epochs, c.train.batch_size, c.loss.gamma) == (50, 30, 1.0)
    assert c.model.arch == "resnet18"


def test_extends_cycle_is_one_line(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match=r"makes a cycle \(a\.yaml → b\.yaml → a\.yaml\)"):
        config.load(str(tmp_path / "a.yaml"))
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    with pytest.raises(UserError, match=r"cycle \(self\.yaml → self\.yaml\)"):
        config.load(str(tmp_path / "self.yaml"))
    one_line_error(sslctl("profiles", "show", str(tmp_path / "a.yaml")), "a.yaml", "cycle")


def test_extends_depth_is_bounded(tmp_path: Path):
    (tmp_path / "p0.yaml").write_text(BASE)
    for i in range(1, config.MAX_EXTENDS + 2):
        (tmp_path / f"p{i}.yaml").write_text(f"extends: p{i - 1}.yaml\ntrain: {{seed: {i}}}\n")
    assert config.load(str(tmp_path / f"p{config.MAX_EXTENDS}.yaml")).train.seed == 8
    with pytest.raises(UserError, match="more than 8 `extends:` steps"):
        config.load(str(tmp_path / f"p{config.MAX_EXTENDS + 1}.yaml"))


def test_extends_keeps_kinds_apart(tmp_path: Path):
    p = tmp_path / "lin.yaml"
    p.write_text("extends: linear-r50\nlinear: {lr: 0.5}\n")
    lin = config.load_linear(str(p))  # the kind comes with the parent
    assert lin.linear.lr == 0.5 and lin.linear.epochs == 100
    with pytest.raises(UserError, match="a linear-eval profile"):
        config.load(str(p))
    p.write_text("kind: pretrain\nextends: linear-r50\n")
    with pytest.raises(UserError, match="kind 'pretrain' but it extends linear-r50 .kind linear"):
        config.load(str(p))


@pytest.mark.parametrize(
    "text, message",
    [
        ("extends: nope-profile\n", "extends: unknown profile 'nope-profile'"),
        ("extends: missing.yaml\n", "extends: profile file not found"),
        ("extends: [demo-cpu]\n", "key 'extends' must name a bundled profile or a .yaml file"),
    ],
)
def test_extends_bad_target(tmp_path: Path, text: str, message: str):
    assert message in load_error(tmp_path, text)


def test_own_pretrain_profile_names_method_and_network(tmp_path: Path):
    msg = load_error(tmp_path, "train: {epochs: 3}\n")
    assert "missing method.name and model.arch" in msg and "extends: NAME" in msg
    msg = load_error(tmp_path, "method: {name: byol}\n")
    assert "missing model.arch;" in msg
    p = tmp_path / "mine.yaml"
    assert config.load(str(p), ["model.arch=resnet18"]).model.arch == "resnet18"  # --set names it
    p.write_text("kind: linear-eval\nlinear: {lr: 0.2}\n")  # linear-eval: the defaults are SPEC §3
    assert config.load_linear(str(p)).linear.lr == 0.2
    with pytest.raises(UserError, match="'extends' is not a settable section"):
        config.load_linear(str(p), ["extends.x=1"])


def test_cli_missing_required_keys_is_one_line(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("train: {epochs: 3}\n")
    r = sslctl("profiles", "show", str(p))
    one_line_error(r, "mine.yaml", "missing method.name and model.arch")


# ----------------------------------------------------------------- 5. sslctl profiles show
def test_cli_show_prints_the_resolved_profile(tmp_path: Path):
    r = sslctl("profiles", "show", "demo-cpu", "--set", "train.epochs=3")
    assert r.returncode == 0, r.stderr
    want = config.load("demo-cpu", ["train.epochs=3"])
    assert config.from_dict(yaml.safe_load(r.stdout), "shown") == want
    p = tmp_path / "shown.yaml"  # the output is a profile of its own
    p.write_text(r.stdout)
    assert config.load(str(p)) == want


def test_cli_show_linear_and_extends(tmp_path: Path):
    p = tmp_path / "lin.yaml"
    p.write_text("extends: linear-r50\nknn: {k: 7}\n")
    r = sslctl("profiles", "show", str(p))
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["kind"] == "linear-eval" and shown["knn"]["k"] == 7
    assert config.linear_from_dict(shown, "shown") == config.load_linear(str(p))


def test_cli_show_prints_brackets_verbatim():
    r = sslctl("profiles", "show", "demo-cpu", "--set", 'init.weights="[bold]w[/bold].pt"')
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["init"]["weights"] == "[bold]w[/bold].pt"


@pytest.mark.slow
def test_cli_profiles_actions():
    r = sslctl("profiles")
    assert r.returncode == 0 and "demo-cpu" in r.stdout and "linear-r50" in r.stdout, r.stderr
    one_line_error(sslctl("profiles", "bogus"), "unknown action 'bogus'", "profiles show NAME")
    one_line_error(sslctl("profiles", "show"), "needs a profile")
    one_line_error(sslctl("profiles", "show", "nope-profile"), "unknown profile 'nope-profile'")
