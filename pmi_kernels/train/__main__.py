"""python -m pmi_kernels.train [train options]: the same as `pmi-opsd train`."""

import sys

from .cli import main

sys.exit(main(["train", *sys.argv[1:]]))
