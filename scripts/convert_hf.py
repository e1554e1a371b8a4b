"""`python scripts/convert_hf.py` = `vishwam-convert-hf` = `python -m vishwam convert-hf` (`vishwam/commands/convert_hf.py`)."""

from vishwam.commands.convert_hf import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.convert_hf import entry

if __name__ == "__main__":
    entry()
