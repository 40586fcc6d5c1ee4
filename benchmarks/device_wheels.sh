# Sourced (from the repository root) by the device scripts: installs the carried wheels in .whl/
# (pytest, diffusers, torchao, ...: the device image lacks them and has no internet) into
# /tmp/site, and puts that and the repository first on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
