#!/usr/bin/env bash
# Run the test suite against torch/torchvision pairs, each in a fresh venv outside the repo, to
# check the floor requirements.txt claims. One summary line per pair on stdout.
#   scripts/check_torch_versions.sh ["torch==X torchvision==Y" ...]   (default: floor, newest)
# Env: DATA_DIR (default ./data), PYTEST_ARGS (default: the whole suite), VENV_DIR (keep the
# venvs there and reuse them; default a temp folder removed at exit), LOG_DIR (pip and pytest
# logs; default a temp folder, printed). Disk: PyPI's Linux torch is the CUDA build (~5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=("$@")
if [ ${#pairs[@]} -eq 0 ]; then
    pairs=("torch==2.3.1 torchvision==0.18.1" "torch==2.15.0 torchvision==0.29.2")
fi
data=$(realpath "${DATA_DIR:-data}")
logs=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/torch-versions-logs.XXXXXX")}
mkdir -p "$logs"
keep=${VENV_DIR:+1}
if [ -z "$keep" ]; then
    VENV_DIR=$(mktemp -d "${TMPDIR:-/tmp}/torch-versions.XXXXXX")
    trap 'rm -rf "$VENV_DIR"' EXIT
fi
echo "logs: $logs"
for pair in "${pairs[@]}"; do
    tag=$(echo "$pair" | tr -c 'A-Za-z0-9.\n' '_')
    venv="$VENV_DIR/$tag"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        # The pair as constraints, so requirements.txt's lines stay as written. PIP_CONFIG_FILE
        # =/dev/null skips every pip config file: this machine's global one caps torch at the
        # local wheel, and neither PIP_CONSTRAINT= nor --isolated lifts that.
        tr ' ' '\n' <<<"$pair" >"$venv/pins.txt"
        if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -r requirements.txt \
            -c "$venv/pins.txt" >"$logs/$tag.pip.log" 2>&1; then
            echo "$pair: pip install failed, see $logs/$tag.pip.log"
            rm -rf "$venv"
            continue
        fi
    fi
    got=$("$venv/bin/python" -c 'import torch as t, torchvision as v
print(t.__version__, v.__version__)')
    start=$SECONDS
    # PATH: anything the tests start by name comes from this venv too.
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    PATH="$venv/bin:$PATH" REQUIRE_DATA=1 DATA_DIR="$data" "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider ${PYTEST_ARGS:-} >"$logs/$tag.pytest.log" 2>&1 || true
    grep -E '^(FAILED|ERROR) ' "$logs/$tag.pytest.log" | sed 's/^/    /' || true
    echo "$pair (installed: $got): $(tail -n 1 "$logs/$tag.pytest.log") [$((SECONDS - start)) s]"
    [ -n "$keep" ] || rm -rf "$venv"  # a few GB each: one at a time on disk
done
