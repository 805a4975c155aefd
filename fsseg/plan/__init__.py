"""``fsseg plan``: the peak GPU memory of a training step and an evaluation step, estimated without a GPU."""
