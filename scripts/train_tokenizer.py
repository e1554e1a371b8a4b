"""`python scripts/train_tokenizer.py` = `vishwam-train-tokenizer` = `python -m vishwam train-tokenizer` (`vishwam/commands/train_tokenizer.py`)."""

from vishwam.commands.train_tokenizer import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.train_tokenizer import entry

if __name__ == "__main__":
    entry()
