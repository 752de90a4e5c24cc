"""The trainer's data: questions read from files (data.py), each context tokenized
(tokenized.py), rollouts packed into one forward per context (packing.py)."""
