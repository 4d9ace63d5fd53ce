"""Held-out perplexity with a documented protocol.

Protocol (sliding window, as in the HF perplexity guide): the split is tokenized as one stream;
windows of `context` tokens start every `stride` tokens; each token is scored once, in the first
window that covers it, so every scored token sees at least `context - stride` tokens of context
(the first window excepted). Token perplexity is exp(total NLL / scored tokens); word perplexity is
exp(total NLL / words), words being whitespace-separated units of the split, which makes it
comparable across tokenizers. `stride == context` gives the non-overlapping blocks used for
validation during training.

    python -m tsparse.eval PATH [--split test] [--context 256] [--stride 128] [--data-dir DIR | --hub]

PATH is a Hugging Face model directory (an export, `save_pretrained`), a hub id, a tsparse run
directory (its --checkpoint) or a .ckpt file inside a run directory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from tsparse.cli import ArgumentParser, one_line_errors, positive_int
from tsparse.checks import ConfigError
from tsparse.data import split_texts
from tsparse.loading import load_with_run_config


@torch.no_grad()
def sliding_window_nll(model: nn.Module, ids: torch.Tensor, context: int, stride: int,
                       batch_size: int = 8) -> tuple[float, int]:
    """Total NLL and number of scored tokens of the 1-D stream `ids` under the protocol above."""
    if not 0 < stride <= context:
        raise ConfigError(f"stride={stride} must be in [1, context={context}]")
    windows, prev_end = [], 0
    for begin in range(0, max(1, ids.numel() - 1), stride):
        end = min(begin + context, ids.numel())
        windows.append((begin, end, end - max(prev_end, begin + 1)))  # (start, end, new tokens to score)
        prev_end = end
        if end == ids.numel():
            break
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        length = max(e - b for b, e, _ in chunk)
        batch = torch.stack([nn.functional.pad(ids[b:e], (0, length - (e - b))) for b, e, _ in chunk])
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        for row, (b, e, new) in enumerate(chunk):
            scored = nll[row, e - b - 1 - new : e - b - 1]  # the last `new` targets of this window
            total += scored.sum().item()
            count += scored.numel()
    return total, count


def perplexity(model: nn.Module, tokenizer, text: str, context: int, stride: int, batch_size: int = 8) -> dict:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    total, count = sliding_window_nll(model, ids, context, stride, batch_size)
    words = len(text.split())
    return {"ppl": math.exp(total / count), "word_ppl": math.exp(total / words), "nll": total / count,
            "scored_tokens": count, "words": words, "context": context, "stride": stride}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m tsparse.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--context", type=positive_int, default=256)
    parser.add_argument("--stride", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--checkpoint", default="last", help="for a run dir: best, last (default) or a .ckpt path")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="local folder with train/validation/test.txt (default: the run's data)")
    source.add_argument("--hub", action="store_true", help="WikiText-2 from the HF hub")
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.output and not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: folder {args.output.parent} does not exist")
    with one_line_errors(OSError):
        model, tokenizer, cfg = load_with_run_config(args.path, args.checkpoint)
        texts = split_texts(cfg, args.data_dir, args.hub)
        result = perplexity(model, tokenizer, texts[args.split], args.context, args.stride, args.batch_size)
    result.update(path=str(args.path), split=args.split)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
