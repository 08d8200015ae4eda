"""detectron2 fine-tuning configs for a converted backbone (SPEC §5), and the train_net.py
that runs them: COCO and VOC R50-C4, in two styles (``reference``, ``moco``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sslctl import UserError, files

# SPEC §5: detectron2's R50-C4 with SyncBN in the backbone and the ROI head, nothing frozen,
# torchvision's RGB normalisation (0–255 scale) and its stride-in-3×3 bottleneck. Two styles of
# the same recipe: "reference" is the paper's code as committed (benchmarks/detection/configs:
# Base-RCNN-C4-BN.yaml under the *_moco.yaml files: lr 0.05, warm-up then cosine, 180k
# iterations); "moco" is detectron2's step schedule as MoCo's configs use it (lr 0.02, VOC 24k).
# Every key written is one of detectron2's config/defaults.py, so get_cfg() merges each file.
_COCO_SCALES = [640, 672, 704, 736, 768, 800, 832, 864, 880]  # 640–880 as the reference lists them
_VOC_SCALES = [480, 512, 544, 576, 608, *_COCO_SCALES]  # 480–880
_PIXEL_MEAN = [123.675, 116.28, 103.53]  # torchvision's ImageNet statistics on the 0–255 scale
_PIXEL_STD = [58.395, 57.12, 57.375]

# What each benchmark trains and tests on, and what the paper reports for it (SPEC §2).
_BENCHMARKS: dict[str, dict[str, Any]] = {
    "coco": {
        "expect": "Triplet: AP box 41.7, AP mask 36.2 (supervised 40.0 / 34.7)",
        "mask": True,
        "classes": 80,
        "scales": _COCO_SCALES,
        "train": ["coco_2017_train"],
        "test": ["coco_2017_val"],
    },
    "voc": {
        "expect": "Triplet: AP50 82.6, AP 56.9, AP75 63.8 (mean of several runs; VOC is noisy)",
        "mask": False,
        "classes": 20,
        "scales": _VOC_SCALES,
        "train": ["voc_2007_trainval", "voc_2012_trainval"],
        "test": ["voc_2007_test"],
    },
}

REFERENCE_BASE = "Base-RCNN-C4-BN"  # the reference's shared base, written beside its two runs
# The reference's Base-RCNN-C4-BN.yaml, value for value. Left out: its REFERENCE_WORLD_SIZE 0
# (detectron2's default, and a key older detectron2 lacks).
_REFERENCE_BASE_CFG: dict[str, Any] = {
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
_REFERENCE_BASE_HEADER = [
    "# The reference's Base-RCNN-C4-BN.yaml (benchmarks/detection/configs in the paper's code),",
    "# written by sslctl convert-detectron; the COCO and VOC configs beside it build on it, it is",
    "# not a run of its own.",
]

# file stem → one fine-tuning run, per style. "note": header lines saying where it departs.
RUNS: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {
        "coco_R_50_C4_2x": {
            "benchmark": "coco",
            "title": "COCO 2017 Mask R-CNN R50-C4, 2x schedule (180k iterations), as the reference",
            "input": {"MAX_SIZE_TRAIN": 1200},
            # As the reference lists them; WarmupCosineLR does not read STEPS.
            "solver": {"STEPS": [120000, 160000], "MAX_ITER": 180000},
            "note": [
                "# Schedule (Base-RCNN-C4-BN.yaml): lr 0.05, 10000 warm-up iterations, cosine."
            ],
        },
        "voc0712_R_50_C4_180k": {
            "benchmark": "voc",
            "title": "PASCAL VOC07+12 Faster R-CNN R50-C4, 180k iterations, as the reference",
            "input": {},
            "solver": {},
            "note": [
                "# MAX_ITER 180000 comes from the base: the reference committed its VOC config",
                "# (pascal_voc_R_50_C4_24k.yaml) without a schedule of its own. The paper's VOC",
                "# table says 24k iterations; --configs-style moco writes that schedule.",
            ],
        },
    },
    "moco": {
        "coco_R_50_C4_2x": {
            "benchmark": "coco",
            "title": "COCO 2017 Mask R-CNN R50-C4, 2x schedule (180k iterations)",
            "solver": {"STEPS": [120000, 160000], "MAX_ITER": 180000, "WARMUP_ITERS": 1000},
        },
        "voc0712_R_50_C4_24k": {
            "benchmark": "voc",
            "title": "PASCAL VOC07+12 Faster R-CNN R50-C4, 24k iterations",
            "solver": {"STEPS": [18000, 22000], "MAX_ITER": 24000, "WARMUP_ITERS": 100},
        },
    },
}
_MOCO_NOTE = [
    "# The reference's own base config trained with BASE_LR 0.05, WarmupCosineLR and",
    "# 10000 warm-up iterations; these follow detectron2's standard step schedule.",
]
STYLES = tuple(RUNS)

TRAIN_SCRIPT = "train_net.py"
_DEPTHS = {"resnet50": 50, "resnet101": 101}  # R-C4's res5 ROI head is built of bottlenecks


def check_style(style: str) -> None:
    if style not in RUNS:
        raise UserError(f"--configs-style must be one of {', '.join(STYLES)}, got '{style}'")


def run_stems(style: str) -> list[str]:
    """The configs of ``style`` that are fine-tuning runs (a base config is not)."""
    check_style(style)
    return list(RUNS[style])


def train_command(directory: Path, stem: str, gpus: int = 8) -> str:
    config = directory / f"{stem}.yaml"
    return f"python {directory / TRAIN_SCRIPT} --config-file {config} --num-gpus {gpus}"


def config_depth(arch: str) -> int:
    """RESNETS.DEPTH for the R-C4 configs; R-18/34 have no bottleneck res5 for the ROI head."""
    if arch not in _DEPTHS:
        raise UserError(
            f"--configs: detectron2's R-C4 models need a bottleneck ResNet ({', '.join(_DEPTHS)}); "
            f"this backbone is {arch}. Convert without --configs and write your own config"
        )
    return _DEPTHS[arch]


def _reference_config(weights: Path, depth: int, stem: str, run: dict[str, Any]) -> dict[str, Any]:
    """The reference's task config and its *_moco.yaml overrides, in one file over the base."""
    b = _BENCHMARKS[run["benchmark"]]
    return {
        "_BASE_": f"{REFERENCE_BASE}.yaml",  # detectron2 resolves it beside this file
        "VERSION": 2,
        "MODEL": {
            "WEIGHTS": str(weights),
            "MASK_ON": b["mask"],
            "PIXEL_MEAN": _PIXEL_MEAN,
            "PIXEL_STD": _PIXEL_STD,
            "RESNETS": {"DEPTH": depth, "STRIDE_IN_1X1": False},
            "ROI_HEADS": {"NUM_CLASSES": b["classes"]},
        },
        "INPUT": {
            "MIN_SIZE_TRAIN": b["scales"],
            "MIN_SIZE_TEST": 800,
            **run["input"],
            "FORMAT": "RGB",
        },
        "DATASETS": {"TRAIN": b["train"], "TEST": b["test"]},
        **({"SOLVER": run["solver"]} if run["solver"] else {}),
        "OUTPUT_DIR": f"output/{stem}",
    }


def _moco_config(weights: Path, depth: int, stem: str, run: dict[str, Any]) -> dict[str, Any]:
    """A self-contained config: detectron2's step schedule at lr 0.02, as MoCo's configs."""
    b = _BENCHMARKS[run["benchmark"]]
    return {
        "VERSION": 2,
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "WEIGHTS": str(weights),
            "MASK_ON": b["mask"],
            "PIXEL_MEAN": _PIXEL_MEAN,
            "PIXEL_STD": _PIXEL_STD,
            "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 0},
            "RESNETS": {
                "DEPTH": depth,
                "NORM": "SyncBN",
                "STRIDE_IN_1X1": False,
                "OUT_FEATURES": ["res4"],
            },
            "RPN": {"IN_FEATURES": ["res4"], "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
            "ROI_HEADS": {
                "NAME": "Res5ROIHeadsExtraNorm",
                "IN_FEATURES": ["res4"],
                "NUM_CLASSES": b["classes"],
            },
        },
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TRAIN": b["scales"], "MIN_SIZE_TEST": 800},
        "DATASETS": {"TRAIN": b["train"], "TEST": b["test"]},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, **run["solver"]},
        "TEST": {"PRECISE_BN": {"ENABLED": True}},
        "OUTPUT_DIR": f"output/{stem}",
    }


def write_configs(
    directory: Path, weights: Path, arch: str, style: str = "reference"
) -> list[Path]:
    """The YAML configs of ``style`` and the training script; returns the files written."""
    check_style(style)
    depth = config_depth(arch)
    directory, weights = directory.resolve(), weights.resolve()
    planned: list[tuple[str, list[str], dict[str, Any]]] = []
    if style == "reference":
        planned.append((REFERENCE_BASE, _REFERENCE_BASE_HEADER, _REFERENCE_BASE_CFG))
    build = _reference_config if style == "reference" else _moco_config
    for stem, run in RUNS[style].items():
        where = "self-contained, no _BASE_" if style == "moco" else f"over {REFERENCE_BASE}.yaml"
        header = [
            f"# {run['title']}.",
            f"# Written by sslctl convert-detectron for {weights.name}; {where}.",
            f"# The paper reports: {_BENCHMARKS[run['benchmark']]['expect']}.",
            f"# Run: {train_command(directory, stem)}",
            "# (datasets under $DETECTRON2_DATASETS; SyncBN needs a distributed run of 2+ GPUs).",
            *(_MOCO_NOTE if style == "moco" else run["note"]),
        ]
        planned.append((stem, header, build(weights, depth, stem, run)))
    written = []
    for stem, header, cfg in planned:
        body = yaml.dump(cfg, Dumper=_ConfigDumper, sort_keys=False, width=100)
        written.append(_write_text(directory / f"{stem}.yaml", "\n".join(header) + "\n" + body))
    written.append(_write_text(directory / TRAIN_SCRIPT, _TRAIN_NET))
    return written


class _ConfigDumper(yaml.SafeDumper):
    """Mappings as blocks, lists on one line: the layout of detectron2's own configs."""


_ConfigDumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _write_text(path: Path, text: str) -> Path:
    try:
        files.write_text(path, text)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


_TRAIN_NET = '''\
"""Fine-tune detectron2 from a backbone converted by `sslctl convert-detectron`.

Usage: python train_net.py --config-file coco_R_50_C4_2x.yaml --num-gpus 8 [KEY VALUE ...]
The configs name ROI head "Res5ROIHeadsExtraNorm" (the R-C4 res5 head followed by one more
normalisation layer, the detection protocol of MoCo and of the reference), registered here.
"""

import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    @classmethod
    def _build_res5_block(cls, cfg):
        stage, channels = super()._build_res5_block(cfg)
        stage.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
        return stage, channels


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if "voc" in dataset_name:
            return PascalVOCDetectionEvaluator(dataset_name)
        folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=folder)


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
'''
