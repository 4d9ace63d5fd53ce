"""Engram gate maps: the gate per token over a text, and the n-grams it opens or closes for.

    python -m tsparse.viz PATH [--text "..."] [--split test] [--max-tokens 4096] [--top 20] [--out DIR] [--wandb]

PATH is a run dir or an exported model dir (`python -m tsparse.export`).

A forward pre-hook on each Engram module captures its (hidden, input_ids) inputs during a forward
pass of the model; the module is then called again with `return_gate=True` to read the gate alpha
of every token. The model reads text in windows of the run's `data.block_size` tokens, batched.

Writes into --out (default: PATH/viz):
- engram_gate_L<i>.png: the gate of layer i over --text (default: the first 60 tokens of the split),
  one labelled cell per token in rows of 12, colour = gate;
- engram_ngrams.md: per layer and n-gram order, the trailing n-grams (decoded) with the highest and
  lowest mean gate over the first --max-tokens tokens of the split, among those seen >= 3 times.
With --wandb the PNGs are also logged as `wandb.Image` (offline without an API key; never prompts).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from tsparse.checks import ConfigError
from tsparse.cli import ArgumentParser, one_line_errors, positive_int
from tsparse.data import split_texts
from tsparse.loading import load_with_run_config, run_config
from tsparse.modules.engram import Engram

DEFAULT_TEXT_TOKENS = 60
MIN_COUNT = 3
# Heatmap geometry in pixels (multiples of 25 at 100 dpi, so the PNG has exactly this size).
DPI, TOKENS_PER_ROW, CELL_WIDTH, CELL_HEIGHT = 100, 12, 100, 50
LEFT, RIGHT, TOP, BOTTOM = 25, 125, 75, 25


def engram_modules(model: nn.Module) -> dict[int, Engram]:
    """Decoder layer index -> Engram module of an augmented model."""
    modules = model.sparse_modules() if hasattr(model, "sparse_modules") else {}
    return {int(name.removeprefix("engram.L")): module for name, module in modules.items() if name.startswith("engram.")}


@torch.no_grad()
def engram_gates(model: nn.Module, ids: Tensor, context: int, batch_size: int = 16) -> dict[int, Tensor]:
    """Gate alpha [N] of every Engram layer for the 1-D token stream `ids` [N], read in windows of
    `context` tokens (the last one padded at its end, which causal layers never see)."""
    engrams = engram_modules(model)
    inputs: dict[int, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in engrams}
    hooks = [module.register_forward_pre_hook(lambda _, args, layer=layer: inputs[layer].append(args[:2]))
             for layer, module in engrams.items()]
    windows = nn.functional.pad(ids, (0, -ids.numel() % context)).view(-1, context)
    model.eval()
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat([engrams[layer](hidden, tokens, return_gate=True)[1].float()
                              for hidden, tokens in inputs[layer]]).flatten()[: ids.numel()]
            for layer in engrams}


def trailing_ngrams(tokenizer, ids: list[int], order: int, context: int) -> dict[int, str]:
    """Position -> decoded text of the `order` tokens ending there, for the positions whose n-gram lies
    inside one window of `context` tokens (so it is the n-gram that Engram looked up)."""
    decode = lru_cache(maxsize=None)(lambda key: tokenizer.decode(list(key)))
    return {t: decode(tuple(ids[t - order + 1 : t + 1])) for t in range(len(ids)) if t % context >= order - 1}


def mean_gate_by_ngram(ngrams: dict[int, str], gates: list[float]) -> list[tuple[str, float, int]]:
    """(n-gram, mean gate, count) of the n-grams seen >= MIN_COUNT times, highest mean first; `ngrams`
    maps a position to the n-gram ending there and `gates[position]` is its gate."""
    seen: dict[str, list[float]] = defaultdict(list)
    for position, ngram in ngrams.items():
        seen[ngram].append(gates[position])
    stats = [(ngram, statistics.fmean(g), len(g)) for ngram, g in seen.items() if len(g) >= MIN_COUNT]
    return sorted(stats, key=lambda s: -s[1])


def _code_cell(text: str) -> str:
    """`text` as a markdown table cell: its repr in a code span (whitespace visible), pipes escaped."""
    return f"`{text!r}`".replace("|", "\\|")


def ngram_report(tokenizer, ids: list[int], gates: dict[int, Tensor], orders: list[int], context: int,
                 top: int, source: str) -> str:
    """Markdown tables of the top and bottom `top` n-grams by mean gate, per layer and order."""
    lines = [f"# Engram gate by n-gram\n\nMean gate α at the last token of each trailing n-gram, over {source}; "
             f"n-grams seen at least {MIN_COUNT} times.\n"]
    for order in orders:
        ngrams = trailing_ngrams(tokenizer, ids, order, context)
        for layer, gate in gates.items():
            stats = mean_gate_by_ngram(ngrams, gate.tolist())
            lines.append(f"## Layer {layer}, {order}-grams ({len(stats)} seen >= {MIN_COUNT} times)\n")
            for title, chosen in (("Highest", stats[:top]), ("Lowest", stats[::-1][:top])):
                lines += [f"**{title} mean gate**\n", "| n-gram | mean gate | count |", "|---|---:|---:|"]
                lines += [f"| {_code_cell(text)} | {mean:.4f} | {count} |" for text, mean, count in chosen]
                lines.append("")
    return "\n".join(lines)


def token_label(tokenizer, token_id: int, width: int = 11) -> str:
    """A short, visible label for one token: spaces as '·', newlines as '\\n'."""
    text = tokenizer.decode([token_id]).replace(" ", "·").replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def heatmap_size(num_tokens: int) -> tuple[int, int]:
    """(width, height) in pixels of the gate heatmap of `num_tokens` tokens."""
    rows = max(1, math.ceil(num_tokens / TOKENS_PER_ROW))
    return LEFT + TOKENS_PER_ROW * CELL_WIDTH + RIGHT, TOP + rows * CELL_HEIGHT + BOTTOM


def plot_gate_heatmap(labels: list[str], gates: list[float], title: str, path: Path) -> None:
    width, height = heatmap_size(len(labels))
    rows = (height - TOP - BOTTOM) // CELL_HEIGHT
    grid = np.full(rows * TOKENS_PER_ROW, np.nan)
    grid[: len(gates)] = gates
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    grid_width, grid_height = TOKENS_PER_ROW * CELL_WIDTH, rows * CELL_HEIGHT
    ax = fig.add_axes((LEFT / width, BOTTOM / height, grid_width / width, grid_height / height))
    image = ax.imshow(grid.reshape(rows, TOKENS_PER_ROW), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, (label, gate) in enumerate(zip(labels, gates)):
        ax.text(i % TOKENS_PER_ROW, i // TOKENS_PER_ROW, label, ha="center", va="center", fontsize=9,
                color="black" if gate > 0.5 else "white")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=11)
    cax = fig.add_axes(((LEFT + grid_width + 25) / width, BOTTOM / height, 20 / width, grid_height / height))
    fig.colorbar(image, cax=cax, label="gate α", ticks=[0.0, 0.5, 1.0])
    fig.savefig(path, dpi=DPI)


def log_to_wandb(cfg: DictConfig | None, name: str, images: dict[str, Path], out: Path) -> None:
    """Log the heatmaps to a `viz` run in the training run's W&B project and group."""
    import wandb

    from tsparse.loggers import use_wandb_offline_without_key

    use_wandb_offline_without_key()
    project = OmegaConf.select(cfg, "logger.wandb.project", default="tsparse") if cfg is not None else "tsparse"
    group = cfg.experiment_name if cfg is not None else "viz"
    with wandb.init(project=project, group=group, name=f"{name}/viz", job_type="viz", dir=out) as run:
        run.log({f"engram/{name}": wandb.Image(str(path)) for name, path in images.items()})


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = ArgumentParser(prog="python -m tsparse.viz", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, metavar="PATH", help="a run dir or an exported HF model dir")
    parser.add_argument("--text", help=f"text of the heatmaps (default: the first {DEFAULT_TEXT_TOKENS} tokens of the split)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens of the split for the n-gram tables")
    parser.add_argument("--top", type=positive_int, default=20, help="n-grams listed at each end")
    parser.add_argument("--out", type=Path, help="output folder (default: PATH/viz)")
    parser.add_argument("--context", type=positive_int, help="window length (default: the run's data.block_size, else 256)")
    parser.add_argument("--data-dir", help="local WikiText-2 folder (default: the run's data, else ../shared)")
    parser.add_argument("--wandb", action="store_true", help="also log the heatmaps to W&B")
    args = parser.parse_args(argv)
    with one_line_errors(OSError):
        run_cfg = run_config(args.path)
        if run_cfg is not None and "engram" not in run_cfg.sparse.modules:
            raise ConfigError(f"{args.path} has no Engram module; train one with sparse=engram, hybrid or triple")
        model, tokenizer, cfg = load_with_run_config(args.path)
        if not engram_modules(model):
            raise ConfigError(f"{args.path} has no Engram module; train one with sparse=engram, hybrid or triple")
        split_text = split_texts(cfg, args.data_dir)[args.split]

    context = args.context or (cfg.data.block_size if cfg is not None else 256)
    name = cfg.run_name if cfg is not None else args.path.name
    split_ids = tokenizer(split_text)["input_ids"][: args.max_tokens]
    text_ids = tokenizer(args.text)["input_ids"] if args.text else split_ids[:DEFAULT_TEXT_TOKENS]
    out = args.out or args.path / "viz"
    out.mkdir(parents=True, exist_ok=True)

    labels = [token_label(tokenizer, i) for i in text_ids]
    images = {}
    for layer, gate in engram_gates(model, torch.tensor(text_ids), context).items():
        images[f"gate_L{layer}"] = out / f"engram_gate_L{layer}.png"
        plot_gate_heatmap(labels, gate.tolist(), f"Engram gate α, layer {layer}: {name}", images[f"gate_L{layer}"])

    orders = sorted({n for module in engram_modules(model).values() for n in module.orders})
    gates = engram_gates(model, torch.tensor(split_ids), context)
    source = f"the first {len(split_ids)} tokens of the {args.split} split"
    ngrams_path = out / "engram_ngrams.md"
    ngrams_path.write_text(ngram_report(tokenizer, split_ids, gates, orders, context, args.top, source))
    if args.wandb:
        log_to_wandb(cfg, name, images, out)
    print(f"wrote {', '.join(p.name for p in images.values())} and {ngrams_path.name} to {out}")
    return {**images, "ngrams": ngrams_path}


if __name__ == "__main__":
    main()
