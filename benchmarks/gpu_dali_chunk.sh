#!/usr/bin/env bash
# Bring the DALI wheel (≈200 MB, with its nvimgcodec/nvcomp/nvjpeg dependencies) to a lent GPU
# machine whose calls carry at most 64 MiB each: one call per chunk folder .daliN (git-ignored,
# made here by benchmarks/make_dali_chunks.sh: the wheels repacked uncompressed, tarred,
# xz-compressed, split into 55 MiB parts, SHA256 in .dali1). Back-to-back calls on the same warm
# machine (DALI_PARTS = the number of folders, 3 for DALI 2.4.0):
#
#   bash benchmarks/gpu_dali_chunk.sh 1      (carry .dali1)
#   bash benchmarks/gpu_dali_chunk.sh 2      (carry .dali2)
#   bash benchmarks/gpu_dali_chunk.sh 3 && bash benchmarks/gpu_check.sh   (carry .dali3)
#
# When the last part has arrived it checks the sha256, unpacks with Python's lzma and installs
# the wheels with pip --no-index --target /tmp/dali_site, where gpu_check.sh finds them.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${DALI_PARTS:-3}
mkdir -p /tmp/dali_parts
cp ".dali$1"/* /tmp/dali_parts/
have=$(ls /tmp/dali_parts/dali.tar.xz.part* | wc -l)
echo "dali chunk $1: $have of $PARTS parts here"
[ "$have" -lt "$PARTS" ] && exit 0
cd /tmp/dali_parts
cat dali.tar.xz.part* > dali.tar.xz
grep ' dali.tar.xz$' SHA256 | sha256sum -c -
rm -rf /tmp/dali_unpacked && mkdir -p /tmp/dali_unpacked
python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('dali.tar.xz')).extractall('/tmp/dali_unpacked', filter='data')"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dali_site \
    /tmp/dali_unpacked/*.whl
# nvimgcodec & co. ship nvidia/__init__.py; drop it so /tmp/dali_site/nvidia joins the machine's
# nvidia namespace (torch's CUDA wheels) instead of hiding it, and extend a regular package too.
rm -f /tmp/dali_site/nvidia/__init__.py
cat > /tmp/dali_site/sitecustomize.py <<'PY'
try:
    import nvidia

    if "/tmp/dali_site/nvidia" not in list(nvidia.__path__):
        nvidia.__path__.append("/tmp/dali_site/nvidia")
except Exception:
    pass
PY
PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/dali_site" python3 -c \
    "import torch, nvidia.dali as d; print('DALI', d.__version__, 'installed in /tmp/dali_site')"
