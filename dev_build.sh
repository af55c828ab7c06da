#!/usr/bin/env bash
# Developer build of pyattr._C into the source tree (pyattr/_C*.so, git-ignored), without pip.
# Use when you work on csrc/ with the source tree on sys.path; users and CI run `pip install .`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
cmake -S . -B build/dev -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build build/dev -j2
cp build/dev/_C*.so pyattr/
echo "built $(ls pyattr/_C*.so)"
