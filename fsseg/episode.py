"""The episode contract between the data and the models (docs/ARCHITECTURE.md, "Episode"): the keys of one episode
and of a batch of them, what a {0, 1, 255} mask means, and the two forms every method derives from it.

This module sits below both `fsseg.data` (which produces episodes) and `fsseg.models` (which consumes them): neither
imports the other. Masks are int64 with 1 = foreground, 0 = background and `IGNORE` (255) = not labelled; a method
that draws or pools a mask counts an ignored pixel as background (`foreground`).
"""

from typing import NotRequired, TypedDict

import torch

IGNORE = 255  # the mask value of unlabelled pixels (object borders in PASCAL, crowd regions in COCO)


class Episode(TypedDict):
    """One episode as a dataset returns it (S = ``img_size``, K = shots, h x w = the evaluation size)."""

    query_img: torch.Tensor  # float32 [3, S, S] in [0, 1]
    query_mask: torch.Tensor  # int64 [S, S] in {0, 1, 255}
    query_mask_eval: torch.Tensor  # int64 [h, w] in {0, 1, 255}
    support_imgs: torch.Tensor  # float32 [K, 3, S, S] in [0, 1]
    support_masks: torch.Tensor  # int64 [K, S, S] in {0, 1, 255}
    class_id: torch.Tensor  # int64 scalar: the query's class
    support_class_id: (
        torch.Tensor
    )  # int64 scalar: the class the supports show (differs under support controls)
    support_control: str  # none | other_class | empty_mask
    episode_idx: torch.Tensor  # int64 scalar: position in the episode sequence
    query_name: str
    support_names: list[str]  # K
    colour_variant: NotRequired[
        torch.Tensor
    ]  # int64 scalar, training with train_augment only (fsseg.data.augment)
    # the latent cache's posterior parameters of the episode's images (training with a latent cache only;
    # fsseg.data.latent_cache): [2C, h', w'] each (the VAE's mean and log-variance)
    query_moments: NotRequired[torch.Tensor]  # the query image
    query_mask_moments: NotRequired[torch.Tensor]  # the query's white-foreground mask image
    support_moments: NotRequired[torch.Tensor]  # [K, 2C, h', w'] the support images
    support_mask_moments: NotRequired[torch.Tensor]  # [K, 2C, h', w'] their mask images


class EpisodeBatch(TypedDict):
    """Episodes collated by the default collate: tensors stacked (B first), strings listed."""

    query_img: torch.Tensor  # [B, 3, S, S]
    query_mask: torch.Tensor  # [B, S, S]
    query_mask_eval: torch.Tensor  # [B, h, w]
    support_imgs: torch.Tensor  # [B, K, 3, S, S]
    support_masks: torch.Tensor  # [B, K, S, S]
    class_id: torch.Tensor  # [B]
    support_class_id: NotRequired[torch.Tensor]  # [B]
    support_control: NotRequired[list[str]]  # B
    episode_idx: torch.Tensor  # [B]
    query_name: list[str]  # B
    support_names: list[
        list[str]
    ]  # K lists of B names (how the default collate transposes a list per episode)
    colour_variant: NotRequired[torch.Tensor]  # [B]
    query_moments: NotRequired[torch.Tensor]  # [B, 2C, h', w']
    query_mask_moments: NotRequired[torch.Tensor]  # [B, 2C, h', w']
    support_moments: NotRequired[torch.Tensor]  # [B, K, 2C, h', w']
    support_mask_moments: NotRequired[torch.Tensor]  # [B, K, 2C, h', w']


def foreground(mask: torch.Tensor) -> torch.Tensor:
    """{0, 1, 255} labels -> {0, 1} float32 of the same shape (ignored pixels count as background)."""
    return (mask == 1).to(torch.float32)


def background(mask: torch.Tensor) -> torch.Tensor:
    """{0, 1, 255} labels -> {0, 1} float32: the labelled background only (ignored pixels are neither)."""
    return (mask == 0).to(torch.float32)


def mask_image(fg: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask ``[..., S, S]`` drawn as an image ``[..., 3, S, S]`` in [0, 1]: white foreground on black."""
    return fg.unsqueeze(-3).expand(*fg.shape[:-2], 3, *fg.shape[-2:])


def fake_batch(
    b: int = 2,
    k: int = 1,
    size: int = 32,
    seed: int = 0,
    eval_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **given: torch.Tensor,
) -> EpisodeBatch:
    """A batch of ``b`` random ``k``-shot episodes at ``size`` px with every key of the contract, for tests and
    benchmarks: random images, masks of one random disc each with the first two columns ignored (255), classes 0,
    episode indices ``0..b-1``. Keys in ``given`` replace the drawn values (an episode's own images or masks); the
    draws are the same whatever is given (one generator seeded with ``seed``). ``dtype``: of the images (float64
    where a test compares two computations equal in exact arithmetic)."""
    g = torch.Generator().manual_seed(seed)

    def discs(n: int, s: int) -> torch.Tensor:  # [n, s, s] in {0, 1, 255}
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        c = torch.randint(s // 4, 3 * s // 4, (n, 2), generator=g)
        r = torch.randint(max(1, s // 8), max(2, s // 3), (n,), generator=g)
        m = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2 < r[
            :, None, None
        ] ** 2
        m = m.long()
        m[:, :, :2] = IGNORE
        return m

    batch = {
        "query_img": torch.rand(b, 3, size, size, generator=g),
        "query_mask": discs(b, size),
        "query_mask_eval": discs(b, eval_size or size),
        "support_imgs": torch.rand(b, k, 3, size, size, generator=g),
        "support_masks": discs(b * k, size).view(b, k, size, size),
        "class_id": torch.zeros(b, dtype=torch.long),
        "support_class_id": torch.zeros(b, dtype=torch.long),
        "support_control": ["none"] * b,
        "episode_idx": torch.arange(b),
        "query_name": [f"q{i}" for i in range(b)],
        "support_names": [[f"s{i}_{j}" for i in range(b)] for j in range(k)],
    }
    unknown = set(given) - set(EpisodeBatch.__annotations__)
    if unknown:
        raise KeyError(f"fake_batch: {sorted(unknown)} are not episode keys (fsseg.episode.EpisodeBatch)")
    batch.update(given)
    batch = {
        key: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for key, v in batch.items()
    }
    if device is not None:
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
    return batch


def unbatch(batch: EpisodeBatch) -> list[Episode]:
    """The episodes of a batch, as a dataset returns them (the inverse of the default collate)."""
    items: list[dict] = [{} for _ in batch["query_name"]]
    for key, value in batch.items():
        for i, item in enumerate(items):
            item[key] = [names[i] for names in value] if key == "support_names" else value[i]
    return items
