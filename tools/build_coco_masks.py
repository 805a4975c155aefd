"""Script form of `fsseg data build-coco-masks` (see `python tools/build_coco_masks.py --help`)."""

import sys

from fsseg.data.tools import main

if __name__ == "__main__":
    sys.exit(main(["build-coco-masks", *sys.argv[1:]], prog="tools/build_coco_masks.py"))
