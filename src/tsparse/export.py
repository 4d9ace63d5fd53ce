"""Export a run as a Hugging Face model.

    python -m tsparse.export RUN_DIR OUT_DIR [--checkpoint best|last|FILE] [--overwrite]

The export is `save_pretrained` (safetensors) plus the tokenizer and `tsparse_export.json` (where it came
from), staged beside OUT_DIR, fsynced and swapped in, so OUT_DIR is never half-written; LoRA adapters are merged
into the base weights. After `import tsparse`, `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it.
tsparse never deletes what it did not write: OUT_DIR may not be, contain or lie inside the run dir; an
existing OUT_DIR must be empty or an earlier export (which is replaced), and anything else is refused
unless --overwrite, which moves it aside to OUT_DIR's parent/.replaced/.
"""
from __future__ import annotations

from pathlib import Path

from tsparse.cli import ArgumentParser, one_line_errors
from tsparse.loading import load_run
from tsparse.saving import check_export_target, save_model


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m tsparse.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checkpoint", default="last", help="best, last (default) or a .ckpt path")
    parser.add_argument("--overwrite", action="store_true", help="move a non-export OUT_DIR aside instead of refusing")
    args = parser.parse_args(argv)
    with one_line_errors(OSError):
        check_export_target(args.out_dir, args.run_dir, args.overwrite)
        model, tokenizer = load_run(args.run_dir, args.checkpoint)
        save_model(model, tokenizer, args.out_dir, {"run_dir": str(args.run_dir.resolve()),
                                                    "checkpoint": args.checkpoint})
    print(f"exported {args.run_dir} ({args.checkpoint}) to {args.out_dir}")


if __name__ == "__main__":
    main()
