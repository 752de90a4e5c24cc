"""The embedded default: the toy model and its tasks (toy.py, tasks.py), the warmed-up base
built once and reused (base_cache.py), and `pmi-opsd compare`, the main job (compare.py)."""
