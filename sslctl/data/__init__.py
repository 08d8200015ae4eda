"""Data: view specs (augmentations as data) and their random draws, dataset readers and list
files, the torchvision backend (``sslctl.data.tv``), the DALI backend (``sslctl.data.dali``,
with ``dali_graph`` and ``dali_runner``), the loader interface the engine trains from
(``sslctl.data.loader``) and the bundled demo data set (``sslctl.data.bundled``).

The backends are imported from their modules, not from here, so that importing the specs
does not pull in torchvision or DALI.
"""

from sslctl.data.listfile import read_list_file
from sslctl.data.readers import (
    MAX_IMAGE_PIXELS,
    DecodeError,
    Sample,
    load_rgb,
    require_dir,
    scan_imagefolder,
)
from sslctl.data.text import quote
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
