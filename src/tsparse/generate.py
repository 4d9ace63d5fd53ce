"""Continue prompts with a tsparse (or any Hugging Face causal LM) model.

    python -m tsparse.generate PATH --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--sample]
        [--temperature T] [--top-p P] [--seed S] [--no-cache] [--checkpoint best|last|FILE] [--device cpu|cuda]
        [--allow-missing-modules]

PATH is an exported HF model dir, a tsparse run dir (its --checkpoint), a .ckpt inside a run dir or a hub
id. The prompts run as one left-padded batch, greedy unless --sample, with the KV cache unless --no-cache;
each prompt is printed with its continuation, a blank line between them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tsparse.checks import ConfigError
from tsparse.cli import ArgumentParser, device_type, one_line_errors, positive_float, positive_int, probability
from tsparse.loading import load_model


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True) -> list[str]:
    """The continuation of each (non-empty) prompt, decoded without special tokens; one left-padded batch."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=use_cache,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def check_length(model, tokenizer, prompts: list[str], max_new_tokens: int) -> None:
    """The longest prompt plus `max_new_tokens` must fit the model's positions."""
    positions = model.config.max_position_embeddings
    longest = max(len(tokenizer(p).input_ids) for p in prompts)
    if longest + max_new_tokens > positions:
        raise ConfigError(f"--max-new-tokens={max_new_tokens}: with the longest prompt's {longest} tokens this "
                          f"exceeds the model's {positions} positions; use at most {max(positions - longest, 0)}")


def main(argv: list[str] | None = None) -> list[str]:
    parser = ArgumentParser(prog="python -m tsparse.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, metavar="PATH")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=probability, default=1.0, help="with --sample: nucleus probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    parser.add_argument("--checkpoint", default="last", help="for a run dir: best, last (default) or a .ckpt path")
    parser.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-missing-modules", action="store_true",
                        help="start sparse-module weights missing from the model dir fresh instead of refusing it")
    args = parser.parse_args(argv)
    if not all(args.prompt):
        parser.error("--prompt must not be empty")
    with one_line_errors(OSError):
        model, tokenizer = load_model(args.path, args.checkpoint, args.allow_missing_modules)
        check_length(model, tokenizer, args.prompt, args.max_new_tokens)
    torch.manual_seed(args.seed)
    with one_line_errors():
        texts = generate(model.to(args.device), tokenizer, args.prompt, args.max_new_tokens, args.sample,
                         args.temperature, args.top_p, use_cache=not args.no_cache)
    print("\n\n".join(prompt + text for prompt, text in zip(args.prompt, texts)))
    return texts


if __name__ == "__main__":
    main()
