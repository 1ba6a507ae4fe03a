"""`python -m dopsd.train --config ...`: the training entry point that launchers (deepspeed, torchrun, srun) run."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
