"""Which data backend serves pre-training, and building its loader from the config."""

from __future__ import annotations

from pathlib import Path

from sslctl import UserError
from sslctl.config import Config
from sslctl.data.readers import read_list_file, scan_imagefolder
from sslctl.data.tv import PretrainLoader
from sslctl.data.views import byol_views
from sslctl.dist import DistInfo


def read_samples(cfg: Config, root: Path) -> list:
    if cfg.data.list_file:
        lst = Path(cfg.data.list_file)
        lst = lst if lst.is_absolute() else root / lst
        if not lst.is_file():
            raise UserError(f"data.list_file {lst}: no such file")
        return read_list_file(lst, root)
    samples, _ = scan_imagefolder(root)
    return samples


def build_pretrain_loader(cfg: Config, root: Path, di: DistInfo) -> PretrainLoader:
    samples = read_samples(cfg, root)
    if not samples:
        raise UserError(f"--data {root}: no images found (expected class folders of .jpg/.png files)")
    specs = byol_views(cfg.data.image_size, cfg.data.crop_scale_min)
    return PretrainLoader(
        samples,
        specs,
        batch_size=cfg.train.batch_size,
        rank=di.rank,
        world=di.world_size,
        seed=cfg.train.seed,
        workers=cfg.data.workers,
        pin_memory=cfg.data.pin_memory and di.device.type == "cuda",
    )
