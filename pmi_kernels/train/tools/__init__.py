"""Tools around a run: `--dry-run` planning (plan.py) and the decomposition of the teacher's
signal on a real model (diagnose.py)."""
