"""Re-ID layouts (REID.md §5), the image dataset, features files, sharded extraction, relaunch."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from sslctl import UserError
from sslctl.backbones import load_backbone
from sslctl.cli.launch import relaunch_with_torchrun, strip_nproc_flag, torchrun_command
from sslctl.convert.weights import read_backbone
from sslctl.eval.features import (
    extract_features,
    extract_features_and_labels,
    shard_range,
    true_fp32,
)
from sslctl.eval.reid import features as rf
from sslctl.eval.reid import layouts as rl
from tests.reid_helpers import make_backbone, write_image

ROOT = Path(__file__).resolve().parents[1]


def _touch(root: Path, *names: str) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_sysu30k_ids_cameras_distractors_and_order(tmp_path):
    _touch(
        tmp_path,
        "query/000028312/000028312_c2_2.jpg",
        "query/000028311/000028311_c2_2.jpg",
        "gallery/000028311/000028311_c1_1.jpg",
        "gallery/0000others/0000others_c1_17.jpg",
        "gallery/0000others/0000others_c12_3.JPG",
        "gallery/0000others/.DS_Store",
        "gallery/0000others/readme.txt",
    )
    q, g = rl.scan_layout("sysu30k", *rl.resolve_roots("sysu30k", tmp_path, None, None))
    assert q.rel == ("000028311/000028311_c2_2.jpg", "000028312/000028312_c2_2.jpg")
    assert q.ids.tolist() == [28311, 28312] and q.cams.tolist() == [2, 2]
    # numeric identity folders sort before 0000others ('2' < 'o'): positives first
    assert g.rel[0].startswith("000028311/") and g.ids.tolist() == [28311, 0, 0]
    assert g.cams.tolist() == [1, 12, 1]  # multi-digit camera; 'c12_3' sorts before 'c1_17'
    lines, warnings = rl.describe("sysu30k", q.ids, q.cams, g.ids, g.cams)
    assert "2 distractors" in lines[0]
    assert any("exactly one gallery image per query identity" in w for w in warnings)


def test_sysu30k_errors_name_the_file(tmp_path):
    _touch(tmp_path, "query/000028311/000028311_c2_2.jpg", "gallery/xyz/foo.jpg")
    with pytest.raises(
        UserError, match=r"cannot parse 'gallery/xyz/foo.jpg': expected <id>_c<cam>"
    ):
        rl.scan_layout("sysu30k", tmp_path / "query", tmp_path / "gallery")
    (tmp_path / "gallery/xyz/foo.jpg").unlink()
    _touch(tmp_path, "gallery/000028312/000028311_c1_1.jpg")  # mis-copied into another folder
    with pytest.raises(
        UserError, match="folder '000028312' does not match the identity '000028311'"
    ):
        rl.scan_layout("sysu30k", tmp_path / "query", tmp_path / "gallery")


@pytest.mark.parametrize("nest", ["", "Market-1501-v15.09.15/"])
def test_market1501_official_tree(tmp_path, nest):
    _touch(
        tmp_path,
        f"{nest}query/0002_c1s1_000451_03.jpg",
        f"{nest}bounding_box_test/-1_c3s2_000001_00.jpg",
        f"{nest}bounding_box_test/0000_c6s1_000002_00.jpg",
        f"{nest}bounding_box_test/0002_c2s1_000301_01.jpg",
        f"{nest}bounding_box_test/0005_c12_f0046985.jpg",  # Duke/MSMT style, 2-digit camera
        f"{nest}bounding_box_test/Thumbs.db",
    )
    qroot, groot = rl.resolve_roots("market1501", tmp_path, None, None)
    assert groot.name == "bounding_box_test"
    q, g = rl.scan_layout("market1501", qroot, groot)
    assert q.ids.tolist() == [2] and q.cams.tolist() == [1]
    assert g.ids.tolist() == [-1, 0, 2, 5] and g.cams.tolist() == [3, 6, 2, 12]


def test_market1501_layumi_tree_explicit_dirs_and_errors(tmp_path):
    _touch(tmp_path, "query/0002/0002_c1s1_000451_03.jpg", "gallery/0002/0002_c2s1_000301_01.jpg")
    qroot, groot = rl.resolve_roots("market1501", tmp_path, None, None)
    assert groot == tmp_path / "gallery"
    assert rl.resolve_roots("market1501", None, qroot, groot) == (qroot, groot)
    with pytest.raises(UserError, match="either --data DIR or both"):
        rl.resolve_roots("market1501", None, qroot, None)
    with pytest.raises(UserError, match="expected query/ and bounding_box_test/"):
        rl.resolve_roots("market1501", tmp_path / "query", None, None)
    _touch(tmp_path, "gallery/0002/c2_0002.jpg")
    with pytest.raises(UserError, match=r"cannot parse 'gallery/0002/c2_0002.jpg'"):
        rl.scan_layout("market1501", qroot, groot)


def test_imagefolder_shared_vocabulary_junk_class_and_cameras(tmp_path):
    _touch(
        tmp_path,
        "query/bob/img_cam3.png",
        "query/alice/x_cam1.png",
        "gallery/alice/y_cam2.png",
        "gallery/carol/z_cam1.png",  # no query counterpart: a distractor
        "gallery/-1/junk_cam1.png",
        "gallery/.ipynb_checkpoints/w_cam1.png",  # hidden folder skipped
    )
    q, g = rl.scan_layout("imagefolder", tmp_path / "query", tmp_path / "gallery")
    # one vocabulary over both splits (alice=1, bob=2, carol=3), not per-split class indices
    assert q.ids.tolist() == [1, 2] and g.ids.tolist() == [-1, 1, 3]
    assert q.cams.tolist() == [-1, -1]
    _, warnings = rl.describe("imagefolder", q.ids, q.cams, g.ids, g.cams)
    assert "camera-unaware protocol: same-camera matches count" in warnings
    q, g = rl.scan_layout(
        "imagefolder", tmp_path / "query", tmp_path / "gallery", camera_regex=r"cam(\d+)"
    )
    assert q.cams.tolist() == [1, 3] and g.cams.tolist() == [1, 2, 1]
    with pytest.raises(UserError, match="finds no camera number"):
        rl.scan_layout(
            "imagefolder", tmp_path / "query", tmp_path / "gallery", camera_regex=r"v(\d)"
        )
    _touch(tmp_path, "query/loose.png")
    with pytest.raises(UserError, match="not inside an identity folder"):
        rl.scan_layout("imagefolder", tmp_path / "query", tmp_path / "gallery")


def test_images_match_the_reference_transform_and_hash(tmp_path):
    path = tmp_path / "a.jpg"
    write_image(path, seed=5, size=(37, 91))
    Image.open(path).convert("L").save(tmp_path / "gray.png")
    ds = rl.ReidImages([path, tmp_path / "gray.png"])
    x, h, i = ds[0]
    ref = transforms.Compose([
        transforms.Resize((256, 128), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(rl.IMAGENET_MEAN, rl.IMAGENET_STD),
    ])(Image.open(path).convert("RGB"))  # fmt: skip
    assert i == 0 and x.shape == (3, 256, 128) and torch.equal(x, ref)
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert rl.hashes_to_hex(h[None]) == [digest]
    assert ds[1][0].shape == (3, 256, 128)  # grayscale becomes RGB


def _write_features(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, str(path))
    return path


def test_features_file_validation(tmp_path):
    f = torch.randn(3, 4)
    ok = _write_features(
        tmp_path / "ok.st",
        features=f.half(),
        ids=torch.arange(3),
        cameras=torch.zeros(3, dtype=torch.int64),
    )
    loaded = rf.load(ok)
    assert loaded.features.dtype == torch.float32 and len(loaded.meta["features_blake2b"]) == 32
    bad = _write_features(
        tmp_path / "b.st", features=f, ids=torch.arange(2), cameras=torch.zeros(3)
    )
    with pytest.raises(UserError, match="'ids' must be 3 integers"):
        rf.load(bad)
    with pytest.raises(UserError, match="missing tensor"):
        rf.load(_write_features(tmp_path / "c.st", features=f))
    assert rf.normalize_(torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == 1


def test_identical_pairs_by_hash_then_by_path():
    meta_q = {"hashes": '["aa", "bb"]', "paths": '["q/1.jpg", "q/2.jpg"]', "root": "/d"}
    meta_g = {"hashes": '["bb", "cc", "bb"]', "paths": '["g/1.jpg", "g/2.jpg", "g/3.jpg"]'}
    z = torch.zeros(2, 1)
    q = rf.FeatureFile(z, torch.zeros(2), torch.zeros(2), meta_q, "q")
    g = rf.FeatureFile(torch.zeros(3, 1), torch.zeros(3), torch.zeros(3), meta_g, "g")
    assert rf.identical_pairs(q, g).tolist() == [[1, 0], [1, 2]]
    q2 = rf.FeatureFile(
        z, torch.zeros(2), torch.zeros(2), {"paths": '["/d/x.jpg", "/d/y.jpg"]'}, "q"
    )
    g2 = rf.FeatureFile(
        z, torch.zeros(2), torch.zeros(2), {"paths": '["/d/y.jpg", "/e/x.jpg"]'}, "g"
    )
    assert rf.identical_pairs(q2, g2).tolist() == [[1, 0]]


def test_shard_ranges_are_contiguous_without_padding():
    for n in (0, 1, 7, 15, 100):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_strip_nproc_flag_and_torchrun_command():
    argv = ["eval-reid", "w.st", "--nproc-per-node", "4", "--out", "o", "--nproc-per-node=2"]
    assert strip_nproc_flag(argv) == ["eval-reid", "w.st", "--out", "o"]
    cmd = torchrun_command(4, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert cmd[-6:] == ["-m", "sslctl", "eval-reid", "w.st", "--out", "o"]
    flags = cmd[6:-6]  # torchrun passes Slurm's SIGUSR1 on too
    assert flags[:2] == ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


@pytest.mark.ddp
def test_relaunch_runs_the_module_in_n_ranks_without_the_flag(tmp_path, monkeypatch):
    (tmp_path / "probe_mod.py").write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "out = Path(sys.argv[1])\n"
        "(out / f\"rank{os.environ['RANK']}\").write_text(' '.join(sys.argv[1:]))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code = relaunch_with_torchrun(2, [str(tmp_path), "--nproc-per-node", "2", "x"], "probe_mod")
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    assert (tmp_path / "rank1").read_text() == f"{tmp_path} x"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="inside a torchrun worker"):
        relaunch_with_torchrun(2, [], "probe_mod")


@pytest.mark.ddp
def test_two_process_extraction_equals_one_process_in_dataset_order(tmp_path):
    weights = make_backbone(tmp_path / "r18.safetensors")
    images = []
    for i in range(7):
        images.append(tmp_path / f"img{i}.jpg")
        write_image(images[-1], seed=i)
    corrupt = tmp_path / "zz_corrupt.jpg"
    corrupt.write_bytes(images[0].read_bytes()[:200])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.reid_ddp_worker", str(tmp_path), str(weights)]  # fmt: skip
    cmd += [*map(str, images), str(corrupt)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model, _ = load_backbone(read_backbone(weights).state, "test")
    one, labels = extract_features_and_labels(
        model, rl.ReidImages(images), batch_size=3, device="cpu", flip=True, normalize=True
    )
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)  # rank 0 receives everything
    feats, hashes = got["odd"]
    assert feats.shape == (7, 512) and torch.equal(hashes, labels)
    torch.testing.assert_close(feats, one, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["single"][0], one[:1], atol=1e-5, rtol=0)
    other = torch.load(tmp_path / "rank1.pt", weights_only=True)  # the others hold nothing
    assert other["odd"][0].shape == (0, 512) and other["single"][0].shape == (0, 512)
    for r in (got, other):
        assert r["error"]  # both ranks stopped, none hung in the gather
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)["error"]
    assert rank1.startswith(f"cannot decode image {corrupt}") and "\n" not in rank1


def test_decode_error_in_a_loader_worker_is_one_line(tmp_path):
    good, bad = tmp_path / "a.jpg", tmp_path / "b.jpg"
    write_image(good, seed=1)
    bad.write_bytes(good.read_bytes()[:150])
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(UserError) as e:
        extract_features_and_labels(
            net, rl.ReidImages([good, bad]), batch_size=1, device="cpu", workers=1
        )
    assert str(e.value).startswith(f"cannot decode image {bad}") and "\n" not in str(e.value)
    feats, _ = extract_features_and_labels(
        net, rl.ReidImages([good]), batch_size=1, device="cpu", flip=True
    )
    x = rl.ReidImages([good])[0][0]
    torch.testing.assert_close(feats[0], x.mean((1, 2)) * 2)  # GAP of image + GAP of mirror


def test_legacy_triplet_fusion_normalises_the_first_view_first(tmp_path):
    path = tmp_path / "a.jpg"
    write_image(path, seed=3)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = rl.ReidImages([path])[0][0]
    f1, f2 = x.mean((1, 2)), x.flip(2).mean((1, 2))
    for fusion, expected in (
        ("sum", F.normalize(f1 + f2, dim=0)),
        ("legacy-triplet", F.normalize(F.normalize(f1, dim=0) + f2, dim=0)),
    ):
        got = extract_features(
            net, rl.ReidImages([path]), batch_size=1, device="cpu", flip=True, fusion=fusion,
            normalize=True,
        )  # fmt: skip
        torch.testing.assert_close(got[0], expected)


def test_reference_fusion_loop_equals_legacy_triplet_on_a_resnet(tmp_path):
    """The reference script's two-view loop, written plainly, on a real backbone."""
    weights = make_backbone(tmp_path / "r18.safetensors")
    net, _ = load_backbone(read_backbone(weights).state, "test")
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    for i, p in enumerate(paths):
        write_image(p, seed=i)
    x = torch.stack([rl.ReidImages(paths)[i][0] for i in range(3)])
    with torch.no_grad():
        ff = torch.zeros(3, 512)
        for view in (x, x.flip(3)):  # ff = ff + f; ff = ff / ‖ff‖, after each view
            ff = ff + net.eval()(view)
            ff = ff.div(torch.norm(ff, p=2, dim=1, keepdim=True))
    got = extract_features(
        net, rl.ReidImages(paths), batch_size=2, device="cpu", flip=True,
        fusion="legacy-triplet", normalize=True,
    )  # fmt: skip
    torch.testing.assert_close(got, ff, atol=1e-5, rtol=0)
    plain_sum = F.normalize(net(x) + net(x.flip(3)), dim=1).detach()
    assert (got - plain_sum).abs().max() > 1e-3  # the two fusions really differ


def test_true_fp32_turns_tf32_off_and_restores_the_flags():
    b = torch.backends
    ops = (b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul, b.mkldnn.conv)
    before = [op.fp32_precision for op in ops]
    b.cuda.matmul.fp32_precision = "tf32"  # as torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(RuntimeError, match="inside"), true_fp32():
            assert [op.fp32_precision for op in ops] == ["ieee"] * 4
            raise RuntimeError("inside")
        assert b.cuda.matmul.fp32_precision == "tf32"
        assert [op.fp32_precision for op in ops[1:]] == before[1:]
    finally:
        b.cuda.matmul.fp32_precision = before[0]
