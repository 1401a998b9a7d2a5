#!/usr/bin/env bash
# adam_face launcher; sets up .venv from requirements.txt when it is missing or stale.
#   ./run.sh [flags]            train + evaluate the embedded demo (configs/demo.py); flags such as
#                               --config.num_train_steps=200 or --workdir=... pass through to main
#   ./run.sh test [pytest args] run the test suite in the same environment, on 2 worker processes
#                               (ADAM_FACE_TEST_WORKERS; pytest's own -n in the args overrides it)
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
want="$(sha256sum requirements.txt | cut -d' ' -f1) $(python3 --version 2>&1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements-stamp" 2>/dev/null)" != "$want" ]]; then
  echo "Setting up $venv from requirements.txt (first run: a few minutes)..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements.txt
  echo "$want" > "$venv/.requirements-stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [[ "${1:-}" == "test" ]]; then
  shift
  # One test file per worker at a time (--dist loadfile), so a module's compiled model and
  # fixtures are built once; two workers keep both cores of a CI machine busy.
  exec python -m pytest -n "${ADAM_FACE_TEST_WORKERS:-2}" --dist loadfile "$@"
fi
exec python -m adam_face.main --config=configs/demo.py --workdir="${ADAM_FACE_WORKDIR:-runs/demo}" "$@"
