#!/usr/bin/env bash
# The test suite: the linter and the formatter's check first (ruff, configured in pyproject.toml), then
# the tests; on a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1.
source "$(dirname "$0")/env.sh"
python -m ruff check .
python -m ruff format --check .
python -m pytest tests "$@"
