"""Weight formats: our checkpoints, extracted backbones, torchvision/reference .pth, detectron2."""
