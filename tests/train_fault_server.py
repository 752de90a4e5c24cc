"""Imported only by the fork server of tests/test_train_faults.py, whose children are the runs
that kill themselves: it imports the trainer and runs it once, single-threaded, so that each
child starts warm (a fresh interpreter spends seconds on imports and first calls) and is forked
from a process with no other thread (a fork copies no thread, so a lock one of them held would
never be released in the child: torch's OpenMP pool, after it has run, hangs a forked child)."""

import os
import pathlib
import tempfile

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer thread pool either

import torch  # noqa: E402

torch.set_num_threads(1)

from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402

with tempfile.TemporaryDirectory() as root:
    Trainer(tiny(pathlib.Path(root), max_steps=1, eval_limit=0, max_new_tokens=6)).train(progress=False)
