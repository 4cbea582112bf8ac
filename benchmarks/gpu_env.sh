# Sourced by the gpu_*.sh scripts: checks OUT, sets ADVDET_HOME and PYTHONPATH (src/ plus the wheels of
# .whl/, installed into /tmp/site, for dependencies the GPU machine's python3 lacks).
OUT=${OUT:?set OUT to a folder}
export PYTHONUNBUFFERED=1 ADVDET_HOME=${ADVDET_HOME:-/tmp/advdet_home}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
