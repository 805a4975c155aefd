"""Script form of `fsseg data build-lvis` (see `python tools/build_lvis_lists.py --help`)."""

import sys

from fsseg.data.tools import main

if __name__ == "__main__":
    sys.exit(main(["build-lvis", *sys.argv[1:]], prog="tools/build_lvis_lists.py"))
