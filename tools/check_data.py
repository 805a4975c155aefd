"""Script form of `fsseg data check` (see `python tools/check_data.py --help`)."""

import sys

from fsseg.data.tools import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]], prog="tools/check_data.py"))
