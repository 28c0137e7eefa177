#!/usr/bin/env bash
# Run the test suite (setting up .venv first when needed). Extra arguments go to pytest.
# pytest's exit code 5 (no tests collected) is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/tandem ] || [ ! -d tandem/v1 ]; then
  bash scripts/setup.sh || exit 1
else
  .venv/bin/python -m tandem.protogen >/dev/null || exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then
  # The whole suite also holds the code to its style and types (a few seconds).
  .venv/bin/ruff check . && .venv/bin/ruff format --check . >/dev/null || { echo "test.sh: ruff failed" >&2; exit 1; }
  .venv/bin/mypy gateway services kernels tandem || { echo "test.sh: mypy failed" >&2; exit 1; }
fi
# The whole suite prints its slowest calls: the 15-minute budget is kept by reading them (docs/operations.md)
durations=()
[ "$#" -eq 0 ] && durations=(--durations=25)
.venv/bin/python -m pytest -q "${durations[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$status"
