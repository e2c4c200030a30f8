#!/usr/bin/env bash
# Fetch the test suite of the installed transformers (its source distribution, which ships tests/) into DEST,
# outside the clone, and print the folder to point TRANSFORMERS_SDIST_TESTS at:
#
#   export TRANSFORMERS_SDIST_TESTS="$(tests/fetch_transformers_tests.sh .venv/bin/python /tmp/transformers-tests)"
#   .venv/bin/python -m pytest tests/test_modeling_upstream.py
#
# PYTHON is the interpreter whose transformers version to match (default: python3). Idempotent: a version
# already unpacked under DEST is reused. Needs the package index; the tests themselves never reach the network.
set -euo pipefail
python="${1:-python3}"
dest="${2:?usage: $0 PYTHON DEST_DIR}"
version="$("$python" -c 'import transformers; print(transformers.__version__)')"
tests_dir="$dest/transformers-$version/tests"
if [ ! -f "$tests_dir/test_modeling_common.py" ]; then
    mkdir -p "$dest"
    "$python" -m pip download -q --no-binary :all: --no-deps --no-build-isolation "transformers==$version" -d "$dest" >&2
    tar -xzf "$dest/transformers-$version.tar.gz" -C "$dest"
fi
test -f "$tests_dir/test_modeling_common.py" || { echo "no tests/ in the transformers $version sdist" >&2; exit 1; }
echo "$tests_dir"
