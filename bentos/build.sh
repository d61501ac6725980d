#!/usr/bin/env bash
# Build the h33-inference Bento: wheel of this checkout + bentofile.yaml.  Run from anywhere:
#   bentos/build.sh            -> prints the Bento tag
# Needs the model in the BentoML store (see bentofile.yaml) and the project's venv on PATH
# (or PYTHON=/path/to/python).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# build from a clean copy so no build/ or egg-info lands in the checkout
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/h33_bento" "$ROOT/runners" "$ROOT/mlflow_flavor" "$WORK/src/"
rm -rf "$HERE/dist" && mkdir -p "$HERE/dist"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation "$WORK/src" -w "$HERE/dist"
"$PYTHON" -m bentoml build -f "$HERE/bentofile.yaml" "$HERE" -o tag "$@"
