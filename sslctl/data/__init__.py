"""Data: view specs (augmentations as data), dataset readers, the torchvision backend
(``sslctl.data.tv``) and the bundled demo data set (``sslctl.data.bundled``).

The backends are imported from their modules, not from here, so that importing the specs
does not pull in torchvision or DALI.
"""

from sslctl.data.readers import (
    MAX_IMAGE_PIXELS,
    DecodeError,
    Sample,
    load_rgb,
    quote,
    read_list_file,
    require_dir,
    scan_imagefolder,
)
from sslctl.data.views import (
    EvalSpec,
    ViewSpec,
    blur_kernel_size,
    byol_views,
    hue_degrees,
    linear_train,
    linear_val,
    mocov2_views,
    reid,
    simclr_views,
    view_pair,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "DecodeError",
    "EvalSpec",
    "Sample",
    "ViewSpec",
    "blur_kernel_size",
    "byol_views",
    "hue_degrees",
    "linear_train",
    "linear_val",
    "load_rgb",
    "mocov2_views",
    "quote",
    "read_list_file",
    "reid",
    "require_dir",
    "scan_imagefolder",
    "simclr_views",
    "view_pair",
]
