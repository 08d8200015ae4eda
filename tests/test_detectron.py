"""convert-detectron: torchvision names → detectron2 pickle (SPEC §5), configs, bad inputs."""

import importlib.util
import io
import pickle
import pickletools
import re

import numpy as np
import pytest
import torch
import yaml
from torchvision import models
from typer.testing import CliRunner

from sslctl import UserError, api
from sslctl.backbones import build_backbone
from sslctl.cli.app import app
from sslctl.convert import detectron as d2

# detectron2 ResNet-50 backbone tensor names (265), pasted once from a torchvision → detectron2
# rename of torchvision.models.resnet50() keys (fc and num_batches_tracked left out); not computed
# by the code under test.
GOLDEN_R50 = """
stem.conv1.weight
stem.conv1.norm.weight
stem.conv1.norm.bias
stem.conv1.norm.running_mean
stem.conv1.norm.running_var
res2.0.conv1.weight
res2.0.conv1.norm.weight
res2.0.conv1.norm.bias
res2.0.conv1.norm.running_mean
res2.0.conv1.norm.running_var
res2.0.conv2.weight
res2.0.conv2.norm.weight
res2.0.conv2.norm.bias
res2.0.conv2.norm.running_mean
res2.0.conv2.norm.running_var
res2.0.conv3.weight
res2.0.conv3.norm.weight
res2.0.conv3.norm.bias
res2.0.conv3.norm.running_mean
res2.0.conv3.norm.running_var
res2.0.shortcut.weight
res2.0.shortcut.norm.weight
res2.0.shortcut.norm.bias
res2.0.shortcut.norm.running_mean
res2.0.shortcut.norm.running_var
res2.1.conv1.weight
res2.1.conv1.norm.weight
res2.1.conv1.norm.bias
res2.1.conv1.norm.running_mean
res2.1.conv1.norm.running_var
res2.1.conv2.weight
res2.1.conv2.norm.weight
res2.1.conv2.norm.bias
res2.1.conv2.norm.running_mean
res2.1.conv2.norm.running_var
res2.1.conv3.weight
res2.1.conv3.norm.weight
res2.1.conv3.norm.bias
res2.1.conv3.norm.running_mean
res2.1.conv3.norm.running_var
res2.2.conv1.weight
res2.2.conv1.norm.weight
res2.2.conv1.norm.bias
res2.2.conv1.norm.running_mean
res2.2.conv1.norm.running_var
res2.2.conv2.weight
res2.2.conv2.norm.weight
res2.2.conv2.norm.bias
res2.2.conv2.norm.running_mean
res2.2.conv2.norm.running_var
res2.2.conv3.weight
res2.2.conv3.norm.weight
res2.2.conv3.norm.bias
res2.2.conv3.norm.running_mean
res2.2.conv3.norm.running_var
res3.0.conv1.weight
res3.0.conv1.norm.weight
res3.0.conv1.norm.bias
res3.0.conv1.norm.running_mean
res3.0.conv1.norm.running_var
res3.0.conv2.weight
res3.0.conv2.norm.weight
res3.0.conv2.norm.bias
res3.0.conv2.norm.running_mean
res3.0.conv2.norm.running_var
res3.0.conv3.weight
res3.0.conv3.norm.weight
res3.0.conv3.norm.bias
res3.0.conv3.norm.running_mean
res3.0.conv3.norm.running_var
res3.0.shortcut.weight
res3.0.shortcut.norm.weight
res3.0.shortcut.norm.bias
res3.0.shortcut.norm.running_mean
res3.0.shortcut.norm.running_var
res3.1.conv1.weight
res3.1.conv1.norm.weight
res3.1.conv1.norm.bias
res3.1.conv1.norm.running_mean
res3.1.conv1.norm.running_var
res3.1.conv2.weight
res3.1.conv2.norm.weight
res3.1.conv2.norm.bias
res3.1.conv2.norm.running_mean
res3.1.conv2.norm.running_var
res3.1.conv3.weight
res3.1.conv3.norm.weight
res3.1.conv3.norm.bias
res3.1.conv3.norm.running_mean
res3.1.conv3.norm.running_var
res3.2.conv1.weight
res3.2.conv1.norm.weight
res3.2.conv1.norm.bias
res3.2.conv1.norm.running_mean
res3.2.conv1.norm.running_var
res3.2.conv2.weight
res3.2.conv2.norm.weight
res3.2.conv2.norm.bias
res3.2.conv2.norm.running_mean
res3.2.conv2.norm.running_var
res3.2.conv3.weight
res3.2.conv3.norm.weight
res3.2.conv3.norm.bias
res3.2.conv3.norm.running_mean
res3.2.conv3.norm.running_var
res3.3.conv1.weight
res3.3.conv1.norm.weight
res3.3.conv1.norm.bias
res3.3.conv1.norm.running_mean
res3.3.conv1.norm.running_var
res3.3.conv2.weight
res3.3.conv2.norm.weight
res3.3.conv2.norm.bias
res3.3.conv2.norm.running_mean
res3.3.conv2.norm.running_var
res3.3.conv3.weight
res3.3.conv3.norm.weight
res3.3.conv3.norm.bias
res3.3.conv3.norm.running_mean
res3.3.conv3.norm.running_var
res4.0.conv1.weight
res4.0.conv1.norm.weight
res4.0.conv1.norm.bias
res4.0.conv1.norm.running_mean
res4.0.conv1.norm.running_var
res4.0.conv2.weight
res4.0.conv2.norm.weight
res4.0.conv2.norm.bias
res4.0.conv2.norm.running_mean
res4.0.conv2.norm.running_var
res4.0.conv3.weight
res4.0.conv3.norm.weight
res4.0.conv3.norm.bias
res4.0.conv3.norm.running_mean
res4.0.conv3.norm.running_var
res4.0.shortcut.weight
res4.0.shortcut.norm.weight
res4.0.shortcut.norm.bias
res4.0.shortcut.norm.running_mean
res4.0.shortcut.norm.running_var
res4.1.conv1.weight
res4.1.conv1.norm.weight
res4.1.conv1.norm.bias
res4.1.conv1.norm.running_mean
res4.1.conv1.norm.running_var
res4.1.conv2.weight
res4.1.conv2.norm.weight
res4.1.conv2.norm.bias
res4.1.conv2.norm.running_mean
res4.1.conv2.norm.running_var
res4.1.conv3.weight
res4.1.conv3.norm.weight
res4.1.conv3.norm.bias
res4.1.conv3.norm.running_mean
res4.1.conv3.norm.running_var
res4.2.conv1.weight
res4.2.conv1.norm.weight
res4.2.conv1.norm.bias
res4.2.conv1.norm.running_mean
res4.2.conv1.norm.running_var
res4.2.conv2.weight
res4.2.conv2.norm.weight
res4.2.conv2.norm.bias
res4.2.conv2.norm.running_mean
res4.2.conv2.norm.running_var
res4.2.conv3.weight
res4.2.conv3.norm.weight
res4.2.conv3.norm.bias
res4.2.conv3.norm.running_mean
res4.2.conv3.norm.running_var
res4.3.conv1.weight
res4.3.conv1.norm.weight
res4.3.conv1.norm.bias
res4.3.conv1.norm.running_mean
res4.3.conv1.norm.running_var
res4.3.conv2.weight
res4.3.conv2.norm.weight
res4.3.conv2.norm.bias
res4.3.conv2.norm.running_mean
res4.3.conv2.norm.running_var
res4.3.conv3.weight
res4.3.conv3.norm.weight
res4.3.conv3.norm.bias
res4.3.conv3.norm.running_mean
res4.3.conv3.norm.running_var
res4.4.conv1.weight
res4.4.conv1.norm.weight
res4.4.conv1.norm.bias
res4.4.conv1.norm.running_mean
res4.4.conv1.norm.running_var
res4.4.conv2.weight
res4.4.conv2.norm.weight
res4.4.conv2.norm.bias
res4.4.conv2.norm.running_mean
res4.4.conv2.norm.running_var
res4.4.conv3.weight
res4.4.conv3.norm.weight
res4.4.conv3.norm.bias
res4.4.conv3.norm.running_mean
res4.4.conv3.norm.running_var
res4.5.conv1.weight
res4.5.conv1.norm.weight
res4.5.conv1.norm.bias
res4.5.conv1.norm.running_mean
res4.5.conv1.norm.running_var
res4.5.conv2.weight
res4.5.conv2.norm.weight
res4.5.conv2.norm.bias
res4.5.conv2.norm.running_mean
res4.5.conv2.norm.running_var
res4.5.conv3.weight
res4.5.conv3.norm.weight
res4.5.conv3.norm.bias
res4.5.conv3.norm.running_mean
res4.5.conv3.norm.running_var
res5.0.conv1.weight
res5.0.conv1.norm.weight
res5.0.conv1.norm.bias
res5.0.conv1.norm.running_mean
res5.0.conv1.norm.running_var
res5.0.conv2.weight
res5.0.conv2.norm.weight
res5.0.conv2.norm.bias
res5.0.conv2.norm.running_mean
res5.0.conv2.norm.running_var
res5.0.conv3.weight
res5.0.conv3.norm.weight
res5.0.conv3.norm.bias
res5.0.conv3.norm.running_mean
res5.0.conv3.norm.running_var
res5.0.shortcut.weight
res5.0.shortcut.norm.weight
res5.0.shortcut.norm.bias
res5.0.shortcut.norm.running_mean
res5.0.shortcut.norm.running_var
res5.1.conv1.weight
res5.1.conv1.norm.weight
res5.1.conv1.norm.bias
res5.1.conv1.norm.running_mean
res5.1.conv1.norm.running_var
res5.1.conv2.weight
res5.1.conv2.norm.weight
res5.1.conv2.norm.bias
res5.1.conv2.norm.running_mean
res5.1.conv2.norm.running_var
res5.1.conv3.weight
res5.1.conv3.norm.weight
res5.1.conv3.norm.bias
res5.1.conv3.norm.running_mean
res5.1.conv3.norm.running_var
res5.2.conv1.weight
res5.2.conv1.norm.weight
res5.2.conv1.norm.bias
res5.2.conv1.norm.running_mean
res5.2.conv1.norm.running_var
res5.2.conv2.weight
res5.2.conv2.norm.weight
res5.2.conv2.norm.bias
res5.2.conv2.norm.running_mean
res5.2.conv2.norm.running_var
res5.2.conv3.weight
res5.2.conv3.norm.weight
res5.2.conv3.norm.bias
res5.2.conv3.norm.running_mean
res5.2.conv3.norm.running_var
""".split()  # noqa: SIM905 - one name per line reads as the data it is


def _tv_name(d2_name: str) -> str:
    """The inverse map, written independently of sslctl: detectron2 name → torchvision name."""
    name = d2_name.removeprefix("stem.")
    name = re.sub(r"^res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", name)
    name = name.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    return re.sub(r"conv(\d)\.norm", r"bn\1", name)


def _random_r50(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict with non-trivial BN running statistics."""
    torch.manual_seed(seed)
    sd = models.resnet50().state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("num_batches_tracked"):
            v.fill_(1234)
    return sd


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    d = tmp_path_factory.mktemp("r50")
    sd = _random_r50()
    torch.save(sd, d / "tv.pth")
    api.extract(d / "tv.pth", d / "r50_backbone.safetensors")
    res = api.convert_detectron(d / "r50_backbone.safetensors", d / "r50_d2.pkl", configs=d / "cfg")
    return d, sd, res


@pytest.fixture(scope="module")
def moco_cfg(r50):
    d, _, _ = r50
    return api.convert_detectron(
        d / "r50_backbone.safetensors", d / "moco.pkl", configs=d / "moco", configs_style="moco"
    )


def test_golden_list_is_what_the_code_expects():
    assert len(GOLDEN_R50) == len(set(GOLDEN_R50)) == 265
    assert sorted(d2.expected_names("resnet50")) == sorted(GOLDEN_R50)


def test_key_map_examples():
    cases = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer3.0.downsample.1.running_mean": "res4.0.shortcut.norm.running_mean",
        "layer4.2.bn3.bias": "res5.2.conv3.norm.bias",
        "layer2.1.conv2.weight": "res3.1.conv2.weight",
    }
    assert {k: d2.detectron2_name(k) for k in cases} == cases


def test_r50_pickle_exact_and_equal(r50):
    d, sd, res = r50
    data = (d / "r50_d2.pkl").read_bytes()
    obj = pickle.loads(data, encoding="latin1")
    assert set(obj) == {"model", "__author__", "matching_heuristics"}
    assert obj["__author__"] == "sslctl" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert sorted(model) == sorted(GOLDEN_R50) and res.tensors == 265
    for name, arr in model.items():
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.flags.writeable
        assert np.array_equal(arr, sd[_tv_name(name)].numpy()), name
    # BN running statistics travel (they are not the init values 0 and 1).
    assert np.abs(model["res5.2.conv3.norm.running_mean"]).sum() > 0
    assert not np.allclose(model["stem.conv1.norm.running_var"], 1.0)
    assert res.counters_dropped == 53


def test_pickle_references_no_numpy_core(r50):
    d, _, _ = r50
    data = (d / "r50_d2.pkl").read_bytes()
    strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    assert not any("numpy._core" in s or "numpy.core" in s for s in strings)
    assert {s for s in strings if "numpy" in s} == {"numpy"}
    globals_seen = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            globals_seen.append((module, name))
            return super().find_class(module, name)

    back = Recorder(io.BytesIO(data), encoding="latin1").load()["model"]
    assert set(globals_seen) == {("numpy", "ndarray"), ("numpy", "dtype")}
    assert back["res4.5.conv2.weight"].shape == (256, 256, 3, 3)


def test_r18_conversion(tmp_path):
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pth")
    res = api.convert_detectron(tmp_path / "r18.pth", tmp_path / "r18.pkl")
    model = pickle.loads((tmp_path / "r18.pkl").read_bytes())["model"]
    # 5 (stem) + 8 blocks × 2 convs × 5 + 3 projection shortcuts (res3–res5) × 5; no res2 shortcut.
    assert res.tensors == len(model) == 100 and res.arch == "resnet18"
    assert "res3.0.shortcut.weight" in model and "res2.0.shortcut.weight" not in model


# Every key the configs write, with the type of its default, as detectron2's
# detectron2/config/defaults.py declares them (facebookresearch/detectron2 at 02b5c4e2; each is
# also in every release since 0.1 except WarmupCosineLR's scheduler name, added in 0.2).
# get_cfg().merge_from_file refuses a key not in its defaults and a value whose type differs
# from the default's (yacs: exact type, except that lists and tuples interchange).
D2_DEFAULTS: dict[str, type] = {
    "VERSION": int,
    "MODEL.META_ARCHITECTURE": str,
    "MODEL.WEIGHTS": str,
    "MODEL.MASK_ON": bool,
    "MODEL.PIXEL_MEAN": list,
    "MODEL.PIXEL_STD": list,
    "MODEL.BACKBONE.NAME": str,
    "MODEL.BACKBONE.FREEZE_AT": int,
    "MODEL.RESNETS.DEPTH": int,
    "MODEL.RESNETS.NORM": str,
    "MODEL.RESNETS.STRIDE_IN_1X1": bool,
    "MODEL.RESNETS.OUT_FEATURES": list,
    "MODEL.RPN.IN_FEATURES": list,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": int,
    "MODEL.RPN.POST_NMS_TOPK_TEST": int,
    "MODEL.ROI_HEADS.NAME": str,
    "MODEL.ROI_HEADS.IN_FEATURES": list,
    "MODEL.ROI_HEADS.NUM_CLASSES": int,
    "INPUT.FORMAT": str,
    "INPUT.MIN_SIZE_TRAIN": tuple,
    "INPUT.MIN_SIZE_TEST": int,
    "INPUT.MAX_SIZE_TRAIN": int,
    "DATASETS.TRAIN": tuple,
    "DATASETS.TEST": tuple,
    "SOLVER.IMS_PER_BATCH": int,
    "SOLVER.BASE_LR": float,
    "SOLVER.LR_SCHEDULER_NAME": str,
    "SOLVER.MAX_ITER": int,
    "SOLVER.MOMENTUM": float,
    "SOLVER.NESTEROV": bool,
    "SOLVER.WARMUP_FACTOR": float,
    "SOLVER.WARMUP_ITERS": int,
    "SOLVER.WARMUP_METHOD": str,
    "SOLVER.STEPS": tuple,
    "TEST.PRECISE_BN.ENABLED": bool,
    "OUTPUT_DIR": str,
}


def _leaves(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merged(path) -> dict:
    """A config as detectron2 reads it: its _BASE_ (beside it) first, then the file on top."""
    cfg = yaml.safe_load(path.read_text())
    base = cfg.pop("_BASE_", None)
    if base is None:
        return cfg
    merged = _merged(path.parent / base)

    def merge(into: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(merged, cfg)
    return merged


def test_every_written_key_is_a_detectron2_key(r50, moco_cfg):
    d, _, _ = r50
    yamls = sorted((d / "cfg").glob("*.yaml")) + sorted((d / "moco").glob("*.yaml"))
    assert len(yamls) == 5
    for path in yamls:
        for cfg in (yaml.safe_load(path.read_text()), _merged(path)):
            base = cfg.pop("_BASE_", None)
            assert base is None or (path.parent / base).is_file(), path
            for key, value in _leaves(cfg).items():
                assert key in D2_DEFAULTS, f"{path.name}: {key} is not in detectron2's defaults"
                want = D2_DEFAULTS[key]
                ok = {list, tuple} if want in (list, tuple) else {want}
                assert type(value) in ok, f"{path.name}: {key}: {value!r} is not a {want}"


REFERENCE_BASE = {
    "VERSION": 2,
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "RPN": {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
        "ROI_HEADS": {"NAME": "Res5ROIHeadsExtraNorm"},
        "BACKBONE": {"FREEZE_AT": 0},
        "RESNETS": {"NORM": "SyncBN"},
    },
    "TEST": {"PRECISE_BN": {"ENABLED": True}},
    "SOLVER": {
        "IMS_PER_BATCH": 16,
        "BASE_LR": 0.05,
        "LR_SCHEDULER_NAME": "WarmupCosineLR",
        "MAX_ITER": 180000,
        "MOMENTUM": 0.9,
        "NESTEROV": False,
        "WARMUP_FACTOR": 0.0001,
        "WARMUP_ITERS": 10000,
        "WARMUP_METHOD": "linear",
    },
}


def test_reference_configs(r50):
    d, _, res = r50
    cfg_dir = (d / "cfg").resolve()
    names = sorted(p.name for p in cfg_dir.iterdir())
    runs = ["coco_R_50_C4_2x.yaml", "voc0712_R_50_C4_180k.yaml"]
    assert names == sorted(["Base-RCNN-C4-BN.yaml", *runs, "train_net.py"])
    assert yaml.safe_load((cfg_dir / "Base-RCNN-C4-BN.yaml").read_text()) == REFERENCE_BASE
    coco, voc = (_merged(cfg_dir / n) for n in runs)
    for c in (coco, voc):
        m = c["MODEL"]
        assert m["WEIGHTS"] == str((d / "r50_d2.pkl").resolve()) and m["RESNETS"]["DEPTH"] == 50
        assert m["PIXEL_MEAN"] == [123.675, 116.280, 103.530]
        assert m["PIXEL_STD"] == [58.395, 57.120, 57.375]
        assert m["RESNETS"]["STRIDE_IN_1X1"] is False and c["INPUT"]["FORMAT"] == "RGB"
        assert m["RPN"] == REFERENCE_BASE["MODEL"]["RPN"] and m["BACKBONE"]["FREEZE_AT"] == 0
        assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
        assert m["RESNETS"]["NORM"] == "SyncBN" and c["TEST"]["PRECISE_BN"]["ENABLED"] is True
        solver = REFERENCE_BASE["SOLVER"]
        assert {k: c["SOLVER"][k] for k in solver} == solver and c["INPUT"]["MIN_SIZE_TEST"] == 800
    assert coco["MODEL"]["MASK_ON"] is True and coco["INPUT"]["MAX_SIZE_TRAIN"] == 1200
    assert coco["INPUT"]["MIN_SIZE_TRAIN"] == [640, 672, 704, 736, 768, 800, 832, 864, 880]
    assert coco["DATASETS"] == {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}
    assert voc["MODEL"]["MASK_ON"] is False and voc["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20
    assert voc["INPUT"]["MIN_SIZE_TRAIN"] == [*range(480, 865, 32), 880]
    assert "MAX_SIZE_TRAIN" not in voc["INPUT"]  # detectron2's 1333, as the reference
    assert voc["DATASETS"] == {
        "TRAIN": ["voc_2007_trainval", "voc_2012_trainval"],
        "TEST": ["voc_2007_test"],
    }
    assert voc["SOLVER"]["MAX_ITER"] == 180000  # the base's, as committed in the reference
    compile((cfg_dir / "train_net.py").read_text(), "train_net.py", "exec")
    assert "class Res5ROIHeadsExtraNorm(Res5ROIHeads)" in (cfg_dir / "train_net.py").read_text()
    assert [c.split("--config-file ")[1].split()[0] for c in res.commands] == [
        str(cfg_dir / n) for n in runs
    ]


def test_moco_configs(r50, moco_cfg):
    d, _, _ = r50
    cfg_dir = (d / "moco").resolve()
    names = sorted(p.name for p in cfg_dir.iterdir())
    assert names == ["coco_R_50_C4_2x.yaml", "train_net.py", "voc0712_R_50_C4_24k.yaml"]
    coco = yaml.safe_load((cfg_dir / "coco_R_50_C4_2x.yaml").read_text())
    voc = yaml.safe_load((cfg_dir / "voc0712_R_50_C4_24k.yaml").read_text())
    for c in (coco, voc):
        assert "_BASE_" not in c and c["MODEL"]["WEIGHTS"] == str((d / "moco.pkl").resolve())
        m = c["MODEL"]
        assert m["BACKBONE"]["FREEZE_AT"] == 0 and m["RESNETS"]["NORM"] == "SyncBN"
        assert m["RESNETS"]["STRIDE_IN_1X1"] is False and m["RESNETS"]["DEPTH"] == 50
        assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
        assert m["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
        assert m["PIXEL_STD"] == [58.395, 57.12, 57.375]
        assert c["INPUT"]["FORMAT"] == "RGB" and c["TEST"]["PRECISE_BN"]["ENABLED"] is True
        assert c["SOLVER"]["IMS_PER_BATCH"] == 16 and max(c["INPUT"]["MIN_SIZE_TRAIN"]) == 880
        assert c["SOLVER"]["BASE_LR"] == 0.02 and "LR_SCHEDULER_NAME" not in c["SOLVER"]
    assert coco["MODEL"]["MASK_ON"] is True and coco["SOLVER"]["MAX_ITER"] == 180000
    assert (
        coco["SOLVER"]["STEPS"] == [120000, 160000] and min(coco["INPUT"]["MIN_SIZE_TRAIN"]) == 640
    )
    assert coco["DATASETS"] == {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}
    assert voc["MODEL"]["MASK_ON"] is False and voc["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20
    assert voc["SOLVER"]["MAX_ITER"] == 24000 and min(voc["INPUT"]["MIN_SIZE_TRAIN"]) == 480
    assert voc["DATASETS"]["TRAIN"] == ["voc_2007_trainval", "voc_2012_trainval"]
    assert voc["DATASETS"]["TEST"] == ["voc_2007_test"]
    compile((cfg_dir / "train_net.py").read_text(), "train_net.py", "exec")
    assert len(moco_cfg.commands) == 2
    assert all(str(cfg_dir / "train_net.py") in c for c in moco_cfg.commands)
    assert any("voc0712_R_50_C4_24k.yaml" in c for c in moco_cfg.commands)


def test_bad_inputs(tmp_path):
    sd = models.resnet50().state_dict()
    no_stats = {k: v for k, v in sd.items() if k != "layer2.1.bn2.running_var"}
    torch.save(no_stats, tmp_path / "no_stats.pth")
    small = build_backbone("resnet18", small_stem=True).state_dict()
    torch.save(small, tmp_path / "small.pth")
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pth")
    torch.save(sd, tmp_path / "r50.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases = [
        ("no_stats.pth", "o.pkl", {}, "layer2.1.bn2.running_var"),
        ("small.pth", "o.pkl", {}, "small-image stem"),
        ("r18.pth", "o.pkl", {"configs": tmp_path / "cfg"}, "bottleneck"),
        (
            "r50.pth",
            "o.pkl",
            {"configs": tmp_path / "cfg", "configs_style": "mmdet"},
            "reference, moco",
        ),
        ("r50.pth", "o.pth", {}, r"\.pkl"),
        ("junk.safetensors", "o.pkl", {}, "not a readable safetensors"),
    ]
    for src, out, kw, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            api.convert_detectron(tmp_path / src, tmp_path / out, **kw)
    assert not (tmp_path / "cfg").exists()
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".sslctl-tmp.*"))


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pth")

    def half_then_fail(obj, fh):
        fh.write(b"\x80\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(d2, "dump", half_then_fail)
    with pytest.raises(UserError, match="cannot write.*No space left"):
        api.convert_detectron(tmp_path / "r18.pth", tmp_path / "o.pkl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pth"]


def test_cli(r50, tmp_path):
    d, _, _ = r50
    runner = CliRunner()
    src = d / "r50_backbone.safetensors"
    args = [
        "convert-detectron",
        str(src),
        "-o",
        str(tmp_path / "x.pkl"),
        "--configs",
        str(tmp_path / "c"),
    ]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "265 tensors" in ok.output and "train_net.py --config-file" in ok.output
    (tmp_path / "bad.pth").write_text("no")
    bad = runner.invoke(
        app, ["convert-detectron", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "y.pkl")]
    )
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "y.pkl").exists()
    moco = runner.invoke(
        app, [*args[:3], str(tmp_path / "m.pkl"), *args[4:6], "--configs-style", "moco"]
    )
    assert moco.exit_code == 0, moco.output
    assert "voc0712_R_50_C4_24k.yaml --num-gpus 8" in " ".join(moco.output.split())
    style = runner.invoke(app, [*args[:3], str(tmp_path / "s.pkl"), "--configs-style", "detectron"])
    assert style.exit_code == 2 and len(style.output.strip().splitlines()) == 1
    assert "--configs-style must be one of reference, moco, got 'detectron'" in style.output
    assert not (tmp_path / "s.pkl").exists()


def test_detectron2_loads_it(r50, moco_cfg):
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    d, sd, _ = r50
    spec = importlib.util.spec_from_file_location("sslctl_train_net", d / "cfg" / "train_net.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers the ROI head
    for path in sorted((d / "cfg").glob("*.yaml")) + sorted((d / "moco").glob("*.yaml")):
        cfg = get_cfg()
        cfg.merge_from_file(str(path))  # refuses unknown keys and mistyped values
        assert _merged(path)["SOLVER"]["MAX_ITER"] == cfg.SOLVER.MAX_ITER, path.name
        reference = path.parent.name == "cfg"
        want = ("WarmupCosineLR", 0.05) if reference else ("WarmupMultiStepLR", 0.02)
        schedule = (cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.BASE_LR)
        assert schedule == want, path.name
        if path.stem == "Base-RCNN-C4-BN":
            continue  # no weights of its own: not a run
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        ck = DetectionCheckpointer(model)
        incompatible = ck._load_model(ck._load_file(cfg.MODEL.WEIGHTS))
        backbone_missing = [
            k
            for k in incompatible.missing_keys
            if k.startswith(("backbone.", "roi_heads.res5."))
            and not k.startswith("roi_heads.res5.norm.")  # the extra head norm is new, by design
            and not k.endswith("num_batches_tracked")
        ]
        assert backbone_missing == [] and incompatible.unexpected_keys == [], path.name
        got = model.state_dict()["backbone.res4.3.conv2.norm.running_mean"].numpy()
        assert np.array_equal(got, sd["layer3.3.bn2.running_mean"].numpy())
        assert "roi_heads.res5.norm.weight" in model.state_dict()  # Res5ROIHeadsExtraNorm's norm
