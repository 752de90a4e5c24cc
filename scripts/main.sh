#!/usr/bin/env bash
# The main job on the embedded default: a tiny model and arithmetic task built locally, taught
# briefly by supervised fine-tuning, then distilled with the PMI target; prints the accuracy
# before and after, and draws the run's metrics (runs/toy/metrics.png). Extra flags go to
# `pmi-opsd train` (see `pmi-opsd train --help`). A rerun replaces the previous runs/toy (the
# trainer refuses a non-empty output directory otherwise), unless it continues it (--resume).
# The exit code is the trainer's: 1 if the run failed, 130/143 if it was interrupted.
source "$(dirname "$0")/env.sh"
replace=(--overwrite)
for arg in "$@"; do
    [ "$arg" = --resume ] && replace=()
done
pmi-opsd train --output-dir runs/toy "${replace[@]}" "$@"
pmi-opsd plot --metrics runs/toy/metrics.jsonl
