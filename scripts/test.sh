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
  .venv/bin/mypy gateway services kernels tandem benchmarks || { echo "test.sh: mypy failed" >&2; exit 1; }
fi
# The whole suite prints its slowest calls: the 15-minute budget is kept by reading them (docs/operations.md)
durations=()
[ "$#" -eq 0 ] && durations=(--durations=25)
# The whole suite runs on two pytest processes (pytest-xdist), a test folder at a time each: most
# folders run in the pytest process on one thread (kernels, worker, styler), which leaves the other
# core to a folder that starts stacks. tests/conftest.py groups the tests by folder.
processes=()
if [ "$#" -eq 0 ] && [ "${TANDEM_TEST_PROCESSES:-2}" -gt 1 ]; then
  if .venv/bin/python -c "import xdist" 2>/dev/null; then
    processes=(-n "${TANDEM_TEST_PROCESSES:-2}" --dist loadscope --no-loadscope-reorder)
  else
    echo "test.sh: pytest-xdist is not installed (scripts/setup.sh installs it); one pytest process" >&2
  fi
fi
.venv/bin/python -m pytest -q "${durations[@]}" "${processes[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$status"
