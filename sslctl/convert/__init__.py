"""Weight formats: our checkpoints, extracted backbones, torchvision and reference .pth, detectron2."""
