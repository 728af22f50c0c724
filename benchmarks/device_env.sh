# Sourced by the GPU check scripts: install the wheels carried in .whl/ (zarr, numcodecs, imagecodecs, openslide,
# ... as py3.12 wheels from ../shared/tools/device-wheels.sh) into .site/ and put it and the repo on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    || { echo "$(basename "$0"): installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
  echo "$(basename "$0"): no .whl/ carried; zarr/imagecodecs/openslide are needed (run ../shared/tools/device-wheels.sh"
  echo "  here and pass carry=[\".whl\"]). Trying anyway."
fi
