#!/usr/bin/env bash
# Wheels that bench/device_check.sh needs on a lent GPU machine and its image lacks (that image
# has Python 3.12, PyTorch, torchvision, transformers, timm, OpenCV, SciPy, tifffile and Pillow,
# and no package index): open_clip_torch, segment_anything and open_clip's ftfy / wcwidth,
# downloaded here into .whl/ (ignored by git through .git/info/exclude), at the versions this
# checkout's venv has where it has them. Run it in the repository's root, where pip can reach
# the package index, before the device call that names .whl in its carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl
PKGS=(open_clip_torch segment_anything ftfy wcwidth)
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi
rm -rf "$WHL" && mkdir -p "$WHL"
for name in "${PKGS[@]}"; do
  spec=$name
  # the version this checkout runs, if its venv has the package
  if [ -x .venv/bin/python ]; then
    v=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    [ -n "$v" ] && spec="$name==$v"
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "$spec"
done
ls -l "$WHL"
du -sh "$WHL"
