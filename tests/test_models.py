"""Model building: micro from scratch, any local HF dir via model.name_or_path, clear errors."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from tsparse.checks import ConfigError
from tsparse.hub import HubUnreachableError, hub_reachable
from tsparse.build import base_with_modules
from tsparse.tokenizer import train_bpe

from helpers import TINY_ARCH, tiny_llama_config


def test_local_hf_dir_loads_through_from_pretrained(tmp_path, wikitext_small):
    tok = train_bpe((wikitext_small / "train.txt").read_text(), 300)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300, num_hidden_layers=2)).eval()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    cfg = OmegaConf.create({"kind": "pretrained", "name_or_path": str(tmp_path / "hf"), "from_scratch": False,
                            "dtype": "float32"})
    loaded, loaded_tok = base_with_modules(cfg, {}, 0, lambda: pytest.fail("no tokenizer training for a pretrained model"))
    ids = torch.tensor([loaded_tok("The castle was built")["input_ids"]])
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def test_missing_micro_base_names_the_experiment(tmp_path):
    cfg = OmegaConf.create({"kind": "micro", "name_or_path": str(tmp_path / "none"), "from_scratch": False,
                            "dtype": "float32"})
    with pytest.raises(ConfigError, match=r"\+experiment=pretrain_micro"):
        base_with_modules(cfg, {}, 0, lambda: "")


def test_hub_model_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    cfg = OmegaConf.create({"kind": "pretrained", "name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                            "from_scratch": False, "dtype": "float32"})
    try:
        with pytest.raises(HubUnreachableError, match="use model=micro"):
            base_with_modules(cfg, {}, 0, lambda: "")
    finally:
        hub_reachable.cache_clear()


def test_bad_dtype_is_a_config_error(wikitext_small, tmp_path):
    cfg = OmegaConf.create({"kind": "micro", "from_scratch": True, "dtype": "float8", "tokenizer_dir": str(tmp_path),
                            "config": {**TINY_ARCH, "vocab_size": 300, "num_hidden_layers": 1}})
    with pytest.raises(ConfigError, match="model.dtype='float8' is not allowed"):
        base_with_modules(cfg, {}, 0, lambda: (wikitext_small / "train.txt").read_text())
