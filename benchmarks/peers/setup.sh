#!/usr/bin/env bash
# Create the two peer virtual environments used by benchmarks/peers/run.py:
#   benchmarks/peers/.venv-orion    Python 3.11 + orion-fhe==1.0.2 (Lattigo backend; the wheel is cp311 only)
#   benchmarks/peers/.venv-tenseal  Python 3.10 + tenseal==0.3.16 + numpy
# Our own framework runs from the project venv (.venv, created by `make install`).
#
#   bash benchmarks/peers/setup.sh            # both
#   bash benchmarks/peers/setup.sh orion      # only one of them
#
# Override the interpreters with PY311=/path/to/python3.11 PY310=/path/to/python3.10.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHICH="${1:-all}"

find_python() {  # $1 = 3.11 | 3.10: prefer pyenv's build (has venv + ensurepip), else PATH
    local v="$1" p=""
    if command -v pyenv >/dev/null 2>&1; then
        p="$(pyenv root)/versions/$(pyenv versions --bare | grep -E "^${v//./\\.}\.[0-9]+$" | sort -V | tail -1)/bin/python${v}"
    fi
    if [[ -z "$p" || ! -x "$p" ]]; then p="$(command -v "python${v}" || true)"; fi
    if [[ -z "$p" ]]; then echo "python${v} not found" >&2; exit 1; fi
    echo "$p"
}

make_venv() {  # $1 = dir, $2 = python, rest = pip requirements
    local dir="$1" py="$2"; shift 2
    if [[ ! -x "$dir/bin/python" ]]; then
        echo "creating $dir with $("$py" --version 2>&1) ($py)"
        "$py" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet "$@"
    "$dir/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("orion-fhe", "tenseal", "torch", "numpy"):
    try:
        print(f"  {name:<10} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
}

if [[ "$WHICH" == all || "$WHICH" == orion ]]; then
    PY311="${PY311:-$(find_python 3.11)}"
    make_venv "$HERE/.venv-orion" "$PY311" "orion-fhe==1.0.2"
    "$HERE/.venv-orion/bin/python" -c "import orion, orion.nn; print('  orion import ok')"
fi
if [[ "$WHICH" == all || "$WHICH" == tenseal ]]; then
    PY310="${PY310:-$(find_python 3.10)}"
    make_venv "$HERE/.venv-tenseal" "$PY310" "tenseal==0.3.16" "numpy"
    "$HERE/.venv-tenseal/bin/python" -c "import tenseal; print('  tenseal import ok')"
fi
