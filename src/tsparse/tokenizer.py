"""A ByteLevel BPE tokenizer trained on the training split, cached by content hash."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a deterministic ByteLevel BPE on `text` (one training document per line)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=1 << 30)


def load_or_train_bpe(text: str, vocab_size: int, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """Return the cached tokenizer for this text and vocab size, training (and caching) it once."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = Path(cache_dir) / digest
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        train_bpe(text, vocab_size).save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: concurrent jobs never see a half-written tokenizer
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(target)
