#!/usr/bin/env bash
# The test suite: on a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1.
source "$(dirname "$0")/env.sh"
python -m pytest tests "$@"
