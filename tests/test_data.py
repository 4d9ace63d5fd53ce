"""Data: packing, split separation, determinism, step-indexed resume, offline hub error."""
import itertools

import pytest
import torch

from tsparse.checks import ConfigError
from tsparse.data import StepIndexedSampler, WikiText2DataModule, load_wikitext, pack
from tsparse.hub import HubUnreachableError, hub_reachable
from tsparse.tokenizer import load_or_train_bpe


@pytest.fixture(scope="module")
def datamodule(wikitext_small, tmp_path_factory):
    texts = load_wikitext("local", wikitext_small)
    tok = load_or_train_bpe(texts["train"], 512, tmp_path_factory.mktemp("tok"))
    dm = WikiText2DataModule(tok, source="local", data_dir=str(wikitext_small), block_size=64, batch_size=4, seed=3)
    dm.setup()
    return dm


def test_pack_drops_tail_without_padding():
    blocks = pack(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_splits_are_separate_and_fully_packed(datamodule, wikitext_small):
    texts = datamodule.texts
    assert set(texts) == {"train", "validation", "test"}
    assert texts["train"] == (wikitext_small / "train.txt").read_text()
    for split, blocks in datamodule.blocks.items():
        assert blocks.shape[1] == 64
        assert datamodule.tokens[split] - blocks.numel() < 64  # only the ragged tail is dropped
    train_rows = {tuple(r) for r in datamodule.blocks["train"].tolist()}
    assert not train_rows & {tuple(r) for r in datamodule.blocks["test"].tolist()}
    assert datamodule.tokens_per_word("test") > 1.0


def test_no_pad_token_in_batches(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (4, 64)
    stream = torch.tensor(datamodule.tokenizer(datamodule.texts["train"])["input_ids"])
    row = batch[0]
    # every training block is a contiguous slice of the tokenized text
    starts = (stream == row[0]).nonzero().flatten()
    assert any(torch.equal(stream[s : s + 64], row) for s in starts.tolist())


def test_train_order_is_seeded_and_resumable():
    a = list(itertools.islice(iter(StepIndexedSampler(10, seed=1)), 35))
    b = list(itertools.islice(iter(StepIndexedSampler(10, seed=1)), 35))
    c = list(itertools.islice(iter(StepIndexedSampler(10, seed=2)), 35))
    assert a == b and a != c
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    resumed = list(itertools.islice(iter(StepIndexedSampler(10, seed=1, start=17)), 18))
    assert resumed == a[17:35]
    ranks = [list(itertools.islice(iter(StepIndexedSampler(10, seed=1, start=4, rank=r, world_size=2)), 8))
             for r in (0, 1)]
    assert ranks[0] == a[4:20:2] and ranks[1] == a[5:20:2]


def test_missing_local_folder_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.data_dir=.* lacks train.txt, validation.txt, test.txt"):
        load_wikitext("local", tmp_path / "nope")


def test_block_size_larger_than_split_is_an_error(wikitext_small, datamodule):
    dm = WikiText2DataModule(datamodule.tokenizer, source="local", data_dir=str(wikitext_small),
                             texts={"train": "a b c", "validation": "a b", "test": "a"}, block_size=64)
    with pytest.raises(ConfigError, match="data.block_size=64 exceeds the train split"):
        dm.setup()


def test_hub_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(HubUnreachableError, match="use data=wikitext2_local"):
            load_wikitext("hub")
    finally:
        hub_reachable.cache_clear()
