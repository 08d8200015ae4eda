#!/usr/bin/env bash
# Make the chunk folders .dali1, .dali2, … that benchmarks/gpu_dali_chunk.sh carries to a GPU
# machine (Python 3.12, x86_64; each call there carries at most 64 MiB). Run here, in the repo
# root; the folders are git-ignored (`/.dali*/` in .git/info/exclude).
#
#   bash benchmarks/make_dali_chunks.sh            # downloads nvidia-dali-cuda130 + its needs
#   WHEELS=/tmp/daliwhl bash benchmarks/make_dali_chunks.sh   # wheels already downloaded
#
# The wheels are zips of compressed members; re-zipped uncompressed ("stored"), tarred and
# xz-compressed they shrink from ≈257 MiB to ≈164 MiB: three 55 MiB chunks instead of five.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.dali\*/' .git/info/exclude 2>/dev/null || echo '/.dali*/' >> .git/info/exclude
WHEELS=${WHEELS:-}
work=$(mktemp -d)
if [ -z "$WHEELS" ]; then
    WHEELS="$work/wheels"
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # DALI's needs that the GPU image lacks (it has numpy, packaging, six, pyyaml's deps, torch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plat[@]}" -d "$WHEELS" nvidia-dali-cuda130 astunparse gast optree \
        nvtx makefun libcst pyyaml nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13==5.3.0.16 \
        nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13
fi
mkdir -p "$work/stored"
python3 - "$WHEELS" "$work/stored" <<'PY'
import sys
import zipfile
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():  # same names, times and permissions; members uncompressed
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
PY
tar -C "$work/stored" -cf "$work/dali.tar" .
xz -T0 -9e --x86 --lzma2=preset=9e,dict=256MiB -c "$work/dali.tar" > "$work/dali.tar.xz" 2>/dev/null \
    || xz -T0 -9 -c "$work/dali.tar" > "$work/dali.tar.xz"
rm -rf .dali[0-9]*
(cd "$work" && split -b 55M dali.tar.xz dali.tar.xz.part && sha256sum dali.tar.xz > SHA256)
i=0
for part in "$work"/dali.tar.xz.part*; do
    i=$((i + 1)); mkdir -p ".dali$i"; mv "$part" ".dali$i/"
done
cp "$work/SHA256" .dali1/
rm -rf "$work"
echo "made $i chunk folders (.dali1 … .dali$i); set DALI_PARTS=$i for gpu_dali_chunk.sh"
