#!/usr/bin/env bash
# The main job: what the method does, on the embedded misread task (docs/demo.md).
# From one warmed-up base (built once into runs/bases, reused by later runs), standard OPSD, the
# PMI target with the frozen-base anchor and with the self anchor run on the same budget; it
# prints their table beside the start (held-out accuracy with its standard error and the paired
# changes, where the answers go wrong (misread, slip), KL(q||p),
# the student's entropy and drift, the markers, the decomposition diagnostics) and draws
# runs/compare/compare.png (accuracy, entropy and drift against steps, one line per run).
# Extra flags go to `pmi-opsd compare` (see `pmi-opsd compare --help`); `--seeds 0,1,2` runs
# it over three seeds (mean and spread). A rerun replaces runs/compare (the cached bases stay).
# The exit code is the comparison's: 2 on a bad flag, 130/143 if it was interrupted.
source "$(dirname "$0")/env.sh"
pmi-opsd compare "$@"
