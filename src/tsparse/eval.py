"""Held-out perplexity with a documented protocol.

Protocol (sliding window, as in the HF perplexity guide): the split is tokenized as one stream;
windows of `context` tokens start every `stride` tokens; each token is scored once, in the first
window that covers it, so every scored token sees at least `context - stride` tokens of context
(the first window excepted). Token perplexity is exp(total NLL / scored tokens); word perplexity is
exp(total NLL / words), words being whitespace-separated units of the split, which makes it
comparable across tokenizers. `stride == context` gives the non-overlapping blocks used for
validation during training.

    python -m tsparse.eval PATH [--split test] [--context 256] [--stride 128] [--data-dir DIR | --hub]

PATH is a Hugging Face model directory (config.json) or a tsparse run directory (config.yaml and
checkpoints/last.ckpt), or a .ckpt file inside a run directory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from tsparse.config import ConfigError, project_root
from tsparse.data import load_wikitext
from tsparse.hub import HubUnreachableError


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
        logits = model(input_ids=batch).logits.float()
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


def load_for_eval(path: Path):
    """(model, tokenizer, run config or None) from an HF dir, a run dir or a checkpoint file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), None
    ckpt = path if path.is_file() else path / "checkpoints" / "last.ckpt"
    run_dir = ckpt.parent.parent
    if not ckpt.is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{path} is neither an HF model dir (config.json) nor a tsparse run dir "
                          "(config.yaml + checkpoints/last.ckpt)")
    from tsparse.build import build_datamodule, build_model
    from tsparse.checkpoint import load_checkpoint

    cfg = OmegaConf.load(run_dir / "config.yaml")
    model, tokenizer = build_model(cfg, build_datamodule(cfg))
    state = load_checkpoint(ckpt)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model, tokenizer, cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tsparse.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="local folder with train/validation/test.txt (default: the run's data)")
    source.add_argument("--hub", action="store_true", help="WikiText-2 from the HF hub")
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, cfg = load_for_eval(args.path)
        if args.hub:
            texts = load_wikitext("hub")
        elif args.data_dir or cfg is None:
            data_dir = args.data_dir or str(Path(project_root()) / ".." / "shared" / "data" / "wikitext-2")
            texts = load_wikitext("local", data_dir)
        else:
            texts = load_wikitext(cfg.data.source, cfg.data.data_dir, cfg.data.hub_name, cfg.data.hub_config)
        result = perplexity(model, tokenizer, texts[args.split], args.context, args.stride, args.batch_size)
    except (ConfigError, HubUnreachableError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result.update(path=str(args.path), split=args.split)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
