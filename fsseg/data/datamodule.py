"""`FewShotDataModule`: one LightningDataModule for every benchmark, fold and shot."""

from __future__ import annotations

import bisect

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader

from fsseg.data import augment
from fsseg.data.base import BAD_MASKS, IMAGE_RESIZES, FewShotDataset
from fsseg.data.latent_cache import LatentCache, LatentMoments, ensure
from fsseg.data.protocol import SUPPORT_CONTROLS
from fsseg.data.registry import benchmark_class
from fsseg.data.samplers import EpisodeSampler, EvalDistributedSampler, ResumableLoader


class EpisodeConcat(ConcatDataset):
    """The in-context training mix. Index ``epoch * len + i`` reaches member ``d`` as ``epoch * len(d) + j``, keeping
    each member's per-index episode draws (see `FewShotDataset`)."""

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), len(self))
        d = bisect.bisect_right(self.cumulative_sizes, i)
        j = i - (self.cumulative_sizes[d - 1] if d else 0)
        return self.datasets[d][epoch * len(self.datasets[d]) + j]


def accumulation_steps(
    effective_batch_size: int, world_size: int, batch_size: int, given: int | None = None
) -> int:
    """The one rule of ``data.effective_batch_size``: the gradient accumulation that makes ``world_size`` processes
    x ``batch_size`` episodes x accumulation equal ``effective_batch_size``. A ValueError naming the numbers when it
    does not divide, or when an accumulation was ``given`` explicitly (``trainer.accumulate_grad_batches``; None:
    not set) with another value: it is derived, never replaced silently."""
    per_step = world_size * batch_size
    if effective_batch_size < 1 or effective_batch_size % per_step:
        raise ValueError(
            f"data.effective_batch_size {effective_batch_size} is not a multiple of {world_size} process(es) x "
            f"data.batch_size {batch_size} = {per_step}: choose devices and batch size whose product divides it"
        )
    needed = effective_batch_size // per_step
    if given is not None and given != needed:
        raise ValueError(
            f"trainer.accumulate_grad_batches {given} was given, but data.effective_batch_size "
            f"{effective_batch_size} with {world_size} process(es) x data.batch_size {batch_size} needs {needed}: "
            f"drop trainer.accumulate_grad_batches (it is derived), or set data.effective_batch_size null to use it"
        )
    return needed


class FewShotDataModule(L.LightningDataModule):
    """Episodic data for training (random episodes) and evaluation (the published, seeded protocol).

    Args:
        root: the data root (FSSBench layout, docs/PROTOCOL.md §1). For ``benchmark: embedded`` the folder the embedded
            benchmark is generated in (default: ``~/.cache/fsseg`` or ``$FSSEG_CACHE``).
        benchmark: a registered benchmark name (``coco20i`` | ``coco_40_20_20`` | ``pascal5i`` | ``fss1000`` |
            ``lvis92i`` | ``ade20k`` | ``embedded``, see `fsseg.data.registry`) or the dotted path of a
            `FewShotDataset` subclass: evaluation, and training unless ``train_benchmarks`` is set.
        fold, shot: the fold and the number of supports.
        img_size: square model input side (a positive integer; at ``setup`` also one the model accepts: its
            ``input_size_error``, e.g. DiffewS a multiple of 64 with SD 2.1). eval_size: evaluation mask side (int),
            ``original``, or null (= img_size).
        image_resize: how query and support images are resized to ``img_size``, in training and evaluation:
            ``torch`` (bilinear with antialias on the float image) or ``pil`` (PIL's bilinear resize of the uint8
            image, the released DiffewS code's; the DiffewS paper configs use it). Recorded in ``metrics.json``.
        bad_masks: a listed mask that does not show its listed class (the query would be scored against an empty
            ground truth, a support would show nothing), or that holds values outside the benchmark's labels:
            ``error`` (default: the episode that reads it stops the run, naming the file) or ``warn`` (used as it
            is; evaluation checks every episode's masks at setup and records the count and the files in
            ``metrics.json``). ``fsseg data check --verify`` lists them all.
        train_episodes, val_episodes, test_episodes: episodes per epoch / in the protocol (null = benchmark default:
            the training list length; 1000 for PASCAL/COCO evaluation; every test image for FSS-1000; 2300 for LVIS).
        batch_size, eval_batch_size, num_workers: loader settings (evaluation episodes do not depend on them).
        effective_batch_size: episodes per optimizer step, whatever the number of processes: at ``fit`` the data
            module sets ``trainer.accumulate_grad_batches = effective_batch_size / (world_size * batch_size)`` and
            refuses, naming the numbers, when that does not divide (or when ``trainer.accumulate_grad_batches`` was
            set to something else; `fsseg fit` also refuses an explicit 1, which this module cannot tell from the
            Trainer's default). null: the trainer's own accumulation, so the effective batch follows the device
            count.
        seed: the protocol seed (0 = the published episodes) and the training-episode seed.
        splits_dir: split-list folder (default: the lists shipped with fsseg).
        train_benchmarks: the in-context training mix, e.g. ``[coco20i, ade20k, pascal5i]``: every class of each,
            concatenated (no fold held out).
        support_control: evaluation episodes with their supports replaced, to measure how much a method uses its
            support: ``none`` (the protocol), ``other_class`` (supports of another class of the fold, drawn from
            the seed), ``empty_mask`` (own support images, all-background masks). Recorded in ``metrics.json``.
        train_augment: training episodes only: ``none`` (every paper recipe) or ``channel_permutation`` (one of
            the 6 RGB channel permutations per episode, the same for its query and supports, drawn from the seed;
            `fsseg.data.augment`). Evaluation episodes are never augmented.
    """

    def __init__(
        self,
        root: str | None = None,
        benchmark: str = "pascal5i",
        fold: int = 0,
        shot: int = 1,
        img_size: int = 400,
        eval_size: int | str | None = None,
        train_episodes: int | None = None,
        val_episodes: int | None = 1000,
        test_episodes: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        effective_batch_size: int | None = None,
        seed: int = 0,
        splits_dir: str | None = None,
        train_benchmarks: list[str] | None = None,
        support_control: str = "none",
        train_augment: str = "none",
        image_resize: str = "torch",
        bad_masks: str = "error",
    ) -> None:
        super().__init__()
        for name in [benchmark, *(train_benchmarks or [])]:
            try:
                benchmark_class(name)
            except ValueError as e:
                raise ValueError(f"data.benchmark: {e}") from e
        if support_control not in SUPPORT_CONTROLS:
            raise ValueError(
                f"data.support_control: expected one of {SUPPORT_CONTROLS}, got {support_control!r}"
            )
        augment.check(train_augment)
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"data.img_size must be a positive integer, got {img_size!r}")
        if isinstance(eval_size, bool) or isinstance(eval_size, int) and eval_size < 1:
            raise ValueError(
                f"data.eval_size must be a positive integer, 'original' or null, got {eval_size!r}"
            )
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"data.image_resize: expected one of {IMAGE_RESIZES}, got {image_resize!r}")
        if bad_masks not in BAD_MASKS:
            raise ValueError(f"data.bad_masks: expected one of {BAD_MASKS}, got {bad_masks!r}")
        if eval_size == "original" and eval_batch_size != 1:
            raise ValueError("data.eval_size 'original' needs data.eval_batch_size 1 (masks differ in size)")
        if effective_batch_size is not None and effective_batch_size < 1:
            raise ValueError(f"data.effective_batch_size must be null or >= 1, got {effective_batch_size}")
        # kept from the logger's hparams: Lightning refuses a key that module and data module both log with other
        # values (DiffewS's model `seed` against `data.seed`, e.g. every seed but 0 of evaluate-seeds); the data
        # settings are recorded in config.yaml and metrics.json
        self.save_hyperparameters(logger=False)
        self.datasets: dict[str, FewShotDataset | ConcatDataset] = {}
        self.bad_mask_scan: dict[
            str, tuple[int, list[str]]
        ] = {}  # split -> `FewShotDataset.scan_masks` (warn)
        self.latent_cache: LatentCache | None = None  # set by `use_latent_cache`

    # ---- which benchmarks and splits ----------------------------------------------------------------------------
    def _uses(self, stage: str | None) -> list[tuple[str, str]]:
        """(benchmark, split) pairs a stage reads (None: every stage)."""
        hp = self.hparams
        out = []
        if stage in (None, "fit"):
            out += [(b, "trn") for b in hp.train_benchmarks or [hp.benchmark]]
        if stage in (None, "fit", "validate"):
            out.append((hp.benchmark, "val"))
        if stage in (None, "test", "predict"):
            out.append((hp.benchmark, "test"))
        return out

    def build(self, split: str, benchmark: str | None = None, fold: int | None = None) -> FewShotDataset:
        hp = self.hparams
        cls = benchmark_class(benchmark or hp.benchmark)
        n = {"trn": hp.train_episodes, "val": hp.val_episodes, "test": hp.test_episodes}[split]
        return cls(
            root=cls.resolve_root(hp.root),
            split=split,
            fold=hp.fold if fold is None else fold,
            shot=hp.shot,
            img_size=hp.img_size,
            eval_size=hp.eval_size,
            n_episodes=n,
            seed=hp.seed,
            splits_dir=hp.splits_dir,
            support_control="none" if split == "trn" else hp.support_control,
            train_augment=hp.train_augment if split == "trn" else "none",
            image_resize=hp.image_resize,
            bad_masks=hp.bad_masks,
        )

    def train_datasets(self) -> list[FewShotDataset]:
        """The training datasets: the benchmark's, or each member of the in-context mix (``train_benchmarks``)."""
        hp = self.hparams
        if hp.train_benchmarks:
            return [self.build("trn", b, fold=-1) for b in hp.train_benchmarks]
        return [self.build("trn")]

    def use_latent_cache(
        self, folder, weights, moments, build_missing: bool = True, device=None
    ) -> LatentCache:
        """Training episodes carry the cached VAE posteriors of their images (`fsseg.data.latent_cache`), for a
        model that trains from them instead of encoding (DiffewS's ``latent_cache``: it calls this from its
        ``prepare_data``, once per node, and from its ``setup("fit")`` with ``build_missing=False``).

        Opens the cache in ``folder`` of the model's encoder (``weights``: the module the fingerprint hashes;
        ``moments``: ``[n, 3, S, S]`` in [0, 1] -> ``[n, 8, h, w]``) and the training datasets, refusing one built
        from other inputs; a missing one is built first when ``build_missing`` (on ``device``, default the
        trainer's). From then on the training loader's episodes come through `LatentMoments`."""
        built = self.datasets.get("trn")
        members = list(getattr(built, "datasets", [built])) if built is not None else self.train_datasets()
        if device is None and self.trainer is not None:
            device = self.trainer.strategy.root_device
        num_workers = self.hparams.num_workers
        self.latent_cache = ensure(folder, weights, moments, members, build_missing, device, num_workers)
        return self.latent_cache

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """One-time work of the benchmarks the current stage reads (ADE20K's class index, the embedded benchmark's
        generation): once per node, before any ``setup``."""
        fn = self.trainer.state.fn if self.trainer is not None else None
        stage = fn.value if fn is not None else None  # fit | validate | test | predict; None: every stage
        self.check_input_size()
        for name, split in dict.fromkeys(self._uses(stage)):
            cls = benchmark_class(name)
            cls.prepare_data(cls.resolve_root(self.hparams.root), split)

    def check_input_size(self) -> None:
        """Refuse ``img_size`` when the trainer's model cannot take it (its ``input_size_error``, by name): where
        model and data meet, before any data is prepared or read."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        check = getattr(model, "input_size_error", None)
        why = check(self.hparams.img_size) if check is not None else None
        if why:
            raise ValueError(f"data.img_size {self.hparams.img_size}: {why}")

    def _eval_dataset(self, split: str) -> FewShotDataset:
        ds = self.build(split)
        if self.hparams.bad_masks == "warn":
            affected, problems = self.bad_mask_scan[split] = ds.scan_masks()
            if problems:
                shown = "; ".join(problems[:3]) + (
                    f"; ... ({len(problems) - 3} more)" if len(problems) > 3 else ""
                )
                rank_zero_warn(
                    f"data.bad_masks: warn: {affected} of {len(ds)} {split} episodes read a bad mask, used as it is "
                    f"(recorded in metrics.json): {shown}"
                )
        return ds

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.check_input_size()
        if stage in (None, "fit"):
            members = self.train_datasets()
            self.datasets["trn"] = EpisodeConcat(members) if hp.train_benchmarks else members[0]
            if stage == "fit" and hp.effective_batch_size is not None and self.trainer is not None:
                self._set_accumulation()
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = self._eval_dataset("val")
        if stage in (None, "test", "predict"):
            self.datasets["test"] = self._eval_dataset("test")

    def _set_accumulation(self) -> None:
        """``trainer.accumulate_grad_batches`` from ``effective_batch_size`` (see the class docstring)."""
        hp, trainer = self.hparams, self.trainer
        given = trainer.accumulate_grad_batches  # 1: the Trainer's default (the CLI checks an explicit 1)
        acc = accumulation_steps(
            hp.effective_batch_size, trainer.world_size, hp.batch_size, given if given != 1 else None
        )
        trainer.accumulate_grad_batches = acc
        rank_zero_info(
            f"effective batch {hp.effective_batch_size} = {trainer.world_size} process(es) x batch {hp.batch_size} "
            f"x accumulation {acc}"
        )
        batches = len(self.datasets["trn"]) // trainer.world_size // hp.batch_size
        if batches % acc:
            rank_zero_warn(
                f"an epoch has {batches} batches per process, not a multiple of the accumulation {acc}: the last "
                f"optimizer step of each epoch sees fewer than {hp.effective_batch_size} episodes"
            )

    def eval_class_ids(self, stage: str) -> list[int]:
        split = "val" if stage in ("val", "validate", "fit") else "test"
        if split not in self.datasets:
            self.setup("validate" if split == "val" else "test")
        return self.datasets[split].class_ids()

    def describe(self) -> dict:
        """Plain facts recorded with every test result."""
        hp = self.hparams
        return {
            "dataset": hp.benchmark,
            "fold": hp.fold,
            "shot": hp.shot,
            "img_size": hp.img_size,
            "resolution": hp.eval_size if hp.eval_size is not None else hp.img_size,
            "seed": hp.seed,
            "support_control": hp.support_control,
            "image_resize": hp.image_resize,
            "bad_masks": self._bad_mask_record(),
            "episodes": len(self.datasets["test"]) if "test" in self.datasets else None,
        }

    def _bad_mask_record(self, limit: int = 50) -> dict:
        """``data.bad_masks`` and what the test episodes read: with ``error`` a finished run read none; with ``warn``
        the episodes that read a bad mask and the problems (the first ``limit``)."""
        affected, problems = self.bad_mask_scan.get("test", (0, []))
        return {"setting": self.hparams.bad_masks, "episodes": affected, "problems": problems[:limit],
                "problems_total": len(problems)}  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["trn"]
        if self.latent_cache is not None:
            ds = LatentMoments(ds, self.latent_cache)
        return ResumableLoader(
            ds,
            batch_size=self.hparams.batch_size,
            sampler=EpisodeSampler(len(ds), seed=self.hparams.seed),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=True,
            processed_batches=self._processed_batches,
        )

    def _processed_batches(self) -> int:
        """Batches of the current epoch the trainer has processed (what a mid-epoch checkpoint has consumed)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        return DataLoader(
            ds,
            batch_size=self.hparams.eval_batch_size,
            sampler=EvalDistributedSampler(len(ds)),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
