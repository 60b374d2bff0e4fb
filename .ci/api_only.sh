#!/usr/bin/env bash
# An API pod installs `tandem[api]` alone. Check that it works without torch: a fresh venv in a temp
# folder, a non-editable install of this working tree with the `api` extra only, then `tandem api --help`
# and the torch-free test run against the installed package (never the source tree).
# Called by `make test` (target api-only); runs on its own as `bash .ci/api_only.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The fresh venv is made without pip (ensurepip alone takes ~20 s here); the project venv's pip installs into it.
PIP="${PIP:-.venv/bin/pip}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Install from a copy of the tracked (and new, not ignored) files, so the build leaves nothing here.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md protocol frontend engine tandem contract \
    | xargs -0 cp --parents -t "$tmp/src"
"$PYTHON" -m venv --without-pip "$tmp/venv"
# (This machine's pip configuration names local index folders that may be missing: drop those warnings.)
"$PIP" --python "$tmp/venv/bin/python" install -q "$tmp/src[api]" pytest 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

if "$tmp/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "api-only: tandem[api] pulled in torch" >&2
    exit 1
fi
"$tmp/venv/bin/tandem" api --help >/dev/null
# The engine side is not there, and the CLI says which extra to install instead of a torch traceback.
if "$tmp/venv/bin/tandem" engine --listen "ipc://$tmp/engine.sock" 2>"$tmp/engine.err"; then
    echo "api-only: tandem engine started without the engine extra" >&2
    exit 1
fi
grep -q "tandem\[engine\]" "$tmp/engine.err" || { cat "$tmp/engine.err" >&2; exit 1; }
# Run from a folder holding only the test file, so imports resolve to the installed package.
mkdir "$tmp/check"
cp tests/frontend/test_torch_free.py "$tmp/check/"
cd "$tmp/check"
"$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider test_torch_free.py
