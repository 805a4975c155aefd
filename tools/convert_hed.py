"""Convert a published HED checkpoint into the safetensors file `fsseg.models.diffseg.hed.HED` loads.

Source: the BSDS500 model of pytorch-hed (github.com/sniklaus/pytorch-hed), ``network-bsds500.pytorch``, a plain
state dict with keys ``moduleVggOne.0.weight`` ... (or ``netVggOne.0.weight`` ...). Key mapping
(`fsseg.models.diffseg.hed.hed_key_mapping`):

    net|moduleVggOne.{0,2}        -> vgg.features_{0,2}           conv1_1, conv1_2
    net|moduleVggTwo.{1,3}        -> vgg.features_{5,7}           conv2_x (index 0 is the max-pool)
    net|moduleVggThr.{1,3,5}      -> vgg.features_{10,12,14}      conv3_x
    net|moduleVggFou.{1,3,5}      -> vgg.features_{17,19,21}      conv4_x
    net|moduleVggFiv.{1,3,5}      -> vgg.features_{24,26,28}      conv5_x
    net|moduleScore{One..Fiv}     -> side.{0..4}                  1x1 side outputs
    net|moduleCombine.0           -> fuse                         1x1 fusion (sigmoid after it)

Usage: python tools/convert_hed.py network-bsds500.pytorch hed-bsds500.safetensors
"""

from __future__ import annotations

import argparse

from fsseg.models.diffseg.hed import convert_hed_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert pytorch-hed's network-bsds500.pytorch to safetensors for fsseg"
    )
    parser.add_argument("src", help="pytorch-hed state dict (network-bsds500.pytorch)")
    parser.add_argument("dst", help="output .safetensors")
    args = parser.parse_args(argv)
    print(convert_hed_checkpoint(args.src, args.dst))


if __name__ == "__main__":
    main()
