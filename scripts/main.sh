#!/usr/bin/env bash
# The main job on the embedded default: a tiny model and arithmetic task built locally, taught
# briefly by supervised fine-tuning, then distilled with the PMI target; prints the accuracy
# before and after, and draws the run's metrics (runs/toy/metrics.png). Extra flags go to
# `pmi-opsd train` (see `pmi-opsd train --help`).
source "$(dirname "$0")/env.sh"
pmi-opsd train --output-dir runs/toy "$@"
pmi-opsd plot --metrics runs/toy/metrics.jsonl
