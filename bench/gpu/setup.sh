# Sourced (not run) from the repository root by bench/gpu/train_stage1.sh and bench/gpu/checks.sh.
#
# Makes the bundle's packages importable for the GPU machine's python3: where `import monai, ignite, nibabel, fire`
# already works (e.g. a development virtual environment) it does nothing; otherwise it installs the wheels that
# bench/gpu/fetch_wheels.sh put in .gpu_wheels/ (carried to the device with carry [".gpu_wheels"]) offline, without
# dependencies, into /tmp/qsm_site (not into the image's own site-packages, which stays as it is) and puts that
# folder on PYTHONPATH, so that subprocesses (pytest, torchrun, monai.bundle) see it too.
# Variables: PYTHON (default python3), WHEELS_DIR (default .gpu_wheels), SITE_DIR (default /tmp/qsm_site),
# FORCE_WHEELS=1 installs even where the packages import already.
# Sets: PY (the interpreter), QSM_SETUP ("present" or "installed"); returns non-zero on failure.
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
_qsm_wheels="${WHEELS_DIR:-.gpu_wheels}"
_qsm_site="${SITE_DIR:-/tmp/qsm_site}"
if [ "${FORCE_WHEELS:-0}" != 1 ] && "$PY" -c 'import monai, ignite, nibabel, fire' 2>/dev/null; then
    QSM_SETUP=present
    echo "setup: monai, ignite, nibabel and fire already import in" \
        "$("$PY" -c 'import sys; print(sys.executable)'); nothing installed"
elif [ "${FORCE_WHEELS:-0}" != 1 ] && [ -d "$_qsm_site/monai" ] \
    && PYTHONPATH="$_qsm_site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import monai, ignite, nibabel, fire' \
        2>/dev/null; then
    export PYTHONPATH="$_qsm_site${PYTHONPATH:+:$PYTHONPATH}"  # installed by an earlier script in this machine
    QSM_SETUP=present
    echo "setup: using the wheels installed earlier in $_qsm_site"
elif ! ls "$_qsm_wheels"/*.whl >/dev/null 2>&1; then
    echo "setup: no wheels in $_qsm_wheels (run bench/gpu/fetch_wheels.sh here and carry .gpu_wheels)" >&2
    false
else
    _qsm_t0=$(date +%s.%N)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_qsm_site" \
        "$_qsm_wheels"/*.whl; then
        export PYTHONPATH="$_qsm_site${PYTHONPATH:+:$PYTHONPATH}"
        QSM_SETUP=installed
        echo "setup: installed $(ls "$_qsm_wheels"/*.whl | wc -l) wheels into $_qsm_site in" \
            "$(awk -v a="$_qsm_t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
        "$PY" - <<'PYEOF'
import importlib.util, fire, ignite, monai, nibabel
print("setup: monai", monai.__version__, "ignite", ignite.__version__, "nibabel", nibabel.__version__,
      "nilearn (data files)", "found" if importlib.util.find_spec("nilearn") else "MISSING")
PYEOF
    else
        echo "setup: pip install from $_qsm_wheels failed" >&2
        false
    fi
fi
