"""WikiText-2 DataModule: load (hub or local folder), concatenate, tokenize, pack into fixed blocks."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from tsparse.checks import ConfigError
from tsparse.config import project_root
from tsparse.hub import require_hub

SPLITS = ("train", "validation", "test")


def load_wikitext(source: str, data_dir: str | None = None, hub_name: str = "Salesforce/wikitext",
                  hub_config: str = "wikitext-2-raw-v1") -> dict[str, str]:
    """Each split as one string, lines kept in order, through `datasets.load_dataset`."""
    from datasets import load_dataset

    if source == "local":
        folder = Path(str(data_dir))
        missing = [s for s in SPLITS if not (folder / f"{s}.txt").is_file()]
        if missing:
            raise ConfigError(f"data.data_dir={str(folder)!r} lacks {', '.join(s + '.txt' for s in missing)}; "
                              "point it at a folder holding train.txt, validation.txt and test.txt")
        ds = load_dataset("text", data_files={s: str(folder / f"{s}.txt") for s in SPLITS}, keep_linebreaks=True)
    else:
        require_hub(f"data={hub_name}/{hub_config}", "data=wikitext2_local (a folder of train/validation/test .txt)")
        ds = load_dataset(hub_name, hub_config)
    return {s: "".join(ds[s]["text"]) for s in SPLITS}


def pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into [num_blocks, block_size], dropping the ragged tail (no padding)."""
    n = ids.numel() // block_size
    return ids[: n * block_size].view(n, block_size)


class Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


class StepIndexedSampler(Sampler[int]):
    """An endless stream of shuffled epochs, indexed by global sample position, so that a resumed run
    continues exactly where it stopped: epoch e is the permutation drawn from seed + e. Under data
    parallelism rank r takes positions r, r + world_size, ... of the same global stream."""

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.seed, self.start, self.rank, self.world_size = num_items, seed, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_items)
        position = self.start
        while True:
            perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            for index in perm[offset:].tolist():
                if position % self.world_size == self.rank:
                    yield index
                position += 1
            epoch, offset = epoch + 1, 0


class WikiText2DataModule(L.LightningDataModule):
    """Serves packed WikiText-2 blocks; train/validation/test stay separate splits."""

    def __init__(self, tokenizer, source: str = "local", data_dir: str | None = None,
                 hub_name: str = "Salesforce/wikitext", hub_config: str = "wikitext-2-raw-v1",
                 block_size: int = 256, batch_size: int = 8, eval_batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0, texts: dict[str, str] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.data_dir, self.hub_name, self.hub_config = source, data_dir, hub_name, hub_config
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self._texts = texts
        self.blocks: dict[str, torch.Tensor] = {}
        self.words: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    @property
    def texts(self) -> dict[str, str]:
        if self._texts is None:
            self._texts = load_wikitext(self.source, self.data_dir, self.hub_name, self.hub_config)
        return self._texts

    def setup(self, stage: str | None = None) -> None:
        if self.blocks:
            return
        for split, text in self.texts.items():
            ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
            self.tokens[split], self.words[split] = ids.numel(), len(text.split())
            self.blocks[split] = pack(ids, self.block_size)
            if len(self.blocks[split]) == 0:
                raise ConfigError(f"data.block_size={self.block_size} exceeds the {split} split ({ids.numel()} tokens)")

    def tokens_per_word(self, split: str) -> float:
        """Converts token-level NLL to word-level NLL (words = whitespace-separated units of the split)."""
        return self.tokens[split] / self.words[split]

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        # After a resume the trainer has restored global_step before the loader is built: skip what was seen.
        start = trainer.global_step * trainer.accumulate_grad_batches * self.batch_size * world if trainer else 0
        sampler = StepIndexedSampler(len(self.blocks["train"]), self.seed, start, rank, world)
        return DataLoader(Blocks(self.blocks["train"]), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(Blocks(self.blocks[split]), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def split_texts(run_cfg, data_dir: str | None = None, hub: bool = False) -> dict[str, str]:
    """WikiText-2 splits: from the hub, from `data_dir`, from the run's data config, or the local copy."""
    if hub:
        return load_wikitext("hub")
    if data_dir or run_cfg is None:
        return load_wikitext("local", data_dir or str(Path(project_root()) / ".." / "shared" / "data" / "wikitext-2"))
    data = run_cfg.data
    return load_wikitext(data.source, data.data_dir, data.hub_name, data.hub_config)


def build_datamodule(cfg: DictConfig, tokenizer=None) -> WikiText2DataModule:
    """The run's DataModule from its `data` config (the tokenizer may come later, from the model)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "source"}
    return WikiText2DataModule(tokenizer, source=cfg.data.source, seed=cfg.seed, **kwargs)
