"""`FewShotDataModule`: one LightningDataModule for every benchmark, fold and shot."""

from __future__ import annotations

import bisect
from pathlib import Path

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader

from fsseg.data.base import FewShotDataset
from fsseg.data.protocol import SUPPORT_CONTROLS
from fsseg.data.samplers import EpisodeSampler, EvalDistributedSampler, ResumableLoader

BENCHMARKS = ("coco20i", "pascal5i", "fss1000", "lvis92i", "ade20k", "embedded")


class EpisodeConcat(ConcatDataset):
    """The in-context training mix. Index ``epoch * len + i`` reaches member ``d`` as ``epoch * len(d) + j``, keeping
    each member's per-index episode draws (see `FewShotDataset`)."""

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), len(self))
        d = bisect.bisect_right(self.cumulative_sizes, i)
        j = i - (self.cumulative_sizes[d - 1] if d else 0)
        return self.datasets[d][epoch * len(self.datasets[d]) + j]


def benchmark_class(name: str) -> type[FewShotDataset]:
    """The dataset class of a benchmark name (imported lazily: LVIS/ADE need pycocotools only when used)."""
    if name in ("pascal5i", "embedded"):
        from fsseg.data.pascal import PascalFewShot as cls
    elif name == "coco20i":
        from fsseg.data.coco import CocoFewShot as cls
    elif name == "fss1000":
        from fsseg.data.fss import FSS1000FewShot as cls
    elif name == "lvis92i":
        from fsseg.data.lvis import LVIS92iDataset as cls
    elif name == "ade20k":
        from fsseg.data.ade import ADE20KFewShot as cls
    else:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    return cls


class FewShotDataModule(L.LightningDataModule):
    """Episodic data for training (random episodes) and evaluation (the published, seeded protocol).

    Args:
        root: the data root (FSSBench layout, see the README). For ``benchmark: embedded`` the folder the embedded
            benchmark is generated in (default: ``~/.cache/fsseg`` or ``$FSSEG_CACHE``).
        benchmark: ``coco20i`` | ``pascal5i`` | ``fss1000`` | ``lvis92i`` | ``embedded`` (evaluation, and training
            unless ``train_benchmarks`` is set).
        fold, shot: the fold and the number of supports.
        img_size: square model input side. eval_size: evaluation mask side (int), ``original``, or null (= img_size).
        train_episodes, val_episodes, test_episodes: episodes per epoch / in the protocol (null = benchmark default:
            the training list length; 1000 for PASCAL/COCO evaluation; every test image for FSS-1000; 2300 for LVIS).
        batch_size, eval_batch_size, num_workers: loader settings (evaluation episodes do not depend on them).
        seed: the protocol seed (0 = the published episodes) and the training-episode seed.
        splits_dir: split-list folder (default: the lists shipped with fsseg).
        train_benchmarks: the in-context training mix, e.g. ``[coco20i, ade20k, pascal5i]``: every class of each,
            concatenated (no fold held out).
        support_control: evaluation episodes with their supports replaced, to measure how much a method uses its
            support: ``none`` (the protocol), ``other_class`` (supports of another class of the fold, drawn from
            the seed), ``empty_mask`` (own support images, all-background masks). Recorded in ``metrics.json``.
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
        seed: int = 0,
        splits_dir: str | None = None,
        train_benchmarks: list[str] | None = None,
        support_control: str = "none",
    ) -> None:
        super().__init__()
        for name in [benchmark, *(train_benchmarks or [])]:
            if name not in BENCHMARKS:
                raise ValueError(f"data.benchmark: unknown benchmark {name!r}; expected one of {BENCHMARKS}")
        if support_control not in SUPPORT_CONTROLS:
            raise ValueError(
                f"data.support_control: expected one of {SUPPORT_CONTROLS}, got {support_control!r}"
            )
        if eval_size == "original" and eval_batch_size != 1:
            raise ValueError("data.eval_size 'original' needs data.eval_batch_size 1 (masks differ in size)")
        self.save_hyperparameters()
        self.datasets: dict[str, FewShotDataset | ConcatDataset] = {}

    # ---- paths ------------------------------------------------------------------------------------------------
    def _root(self, benchmark: str) -> Path:
        hp = self.hparams
        if benchmark == "embedded":
            from fsseg.data.embedded import MARKER_NAME, ensure_embedded_benchmark

            if hp.root and (Path(hp.root) / MARKER_NAME).is_file():  # an embedded benchmark generated before
                return Path(hp.root)
            return ensure_embedded_benchmark(Path(hp.root) if hp.root else None, seed=0)
        if hp.root is None:
            raise ValueError(
                "data.root is not set: give the folder that holds COCO2014/, VOC2012/, FSS-1000/, LVIS/"
            )
        root = Path(hp.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist")
        return root

    def _splits(self, benchmark: str, root: Path) -> str | None:
        if benchmark == "embedded" and self.hparams.splits_dir is None:
            return str(root / "splits")
        return self.hparams.splits_dir

    def build(self, split: str, benchmark: str | None = None, fold: int | None = None) -> FewShotDataset:
        hp = self.hparams
        benchmark = benchmark or hp.benchmark
        root = self._root(benchmark)
        n = {"trn": hp.train_episodes, "val": hp.val_episodes, "test": hp.test_episodes}[split]
        return benchmark_class(benchmark)(
            root=root,
            split=split,
            fold=hp.fold if fold is None else fold,
            shot=hp.shot,
            img_size=hp.img_size,
            eval_size=hp.eval_size,
            n_episodes=n,
            seed=hp.seed,
            splits_dir=self._splits(benchmark, root),
            support_control="none" if split == "trn" else hp.support_control,
        )

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if "embedded" in [self.hparams.benchmark, *(self.hparams.train_benchmarks or [])]:
            self._root("embedded")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            if hp.train_benchmarks:
                self.datasets["trn"] = EpisodeConcat(
                    [self.build("trn", b, fold=-1) for b in hp.train_benchmarks]
                )
            else:
                self.datasets["trn"] = self.build("trn")
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = self.build("val")
        if stage in (None, "test", "predict"):
            self.datasets["test"] = self.build("test")

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
            "episodes": len(self.datasets["test"]) if "test" in self.datasets else None,
        }

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["trn"]
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
