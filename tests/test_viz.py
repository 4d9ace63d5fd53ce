"""tsparse.viz on a real tiny Engram run: gate capture, heatmap PNGs, n-gram tables, W&B images, errors."""
import math
import re
import shutil

import pytest
import torch
from matplotlib.image import imread

from tsparse import viz
from tsparse import eval as eval_cli
from tsparse.loading import load_with_run_config


TEXT = "The game was released in Japan in 2011 , and the series was praised for its story and its music ."


@pytest.fixture(scope="module")
def engram_run(tmp_path_factory, wikitext_small, one_thread, tiny_run):
    root = tmp_path_factory.mktemp("engram")
    tiny_run(root, wikitext_small, root / "run", "+experiment=engram")
    return root / "run"


def test_gates_match_the_module_and_do_not_depend_on_batching(engram_run):
    model, tokenizer, _ = load_with_run_config(engram_run)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"][:40])
    whole = viz.engram_gates(model, ids, context=64)
    windowed = viz.engram_gates(model, ids, context=16, batch_size=2)  # windows 0:16, 16:32, 32:40 (padded)
    pieces = [viz.engram_gates(model, ids[a:b], context=64) for a, b in ((0, 16), (16, 32), (32, 40))]

    engrams = viz.engram_modules(model)
    assert sorted(whole) == sorted(engrams) == [0, 1]
    for module in engrams.values():
        module.track_stats = True
    with torch.no_grad():
        model(input_ids=ids[None])
    for layer, gate in whole.items():
        assert gate.shape == (40,) and 0.0 <= gate.min() and gate.max() <= 1.0 and gate.std() > 0
        assert gate.mean().item() == pytest.approx(engrams[layer].stats["gate_mean"].item(), abs=1e-6)
        torch.testing.assert_close(windowed[layer], torch.cat([p[layer] for p in pieces]))
        torch.testing.assert_close(windowed[layer][:16], gate[:16])


def test_heatmaps_ngram_tables_and_wandb_images(engram_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "viz"
    files = viz.main([str(engram_run), "--text", TEXT, "--max-tokens", "1024", "--top", "5", "--out", str(out),
                      "--wandb"])

    _, tokenizer, cfg = load_with_run_config(engram_run)
    num_tokens = len(tokenizer(TEXT)["input_ids"])
    layers = list(cfg.engram.layers)
    assert sorted(p.name for p in out.glob("*.png")) == [f"engram_gate_L{i}.png" for i in layers]
    width, height = viz.heatmap_size(num_tokens)
    assert height == viz.TOP + viz.BOTTOM + math.ceil(num_tokens / viz.TOKENS_PER_ROW) * viz.CELL_HEIGHT
    for layer in layers:
        image = imread(files[f"gate_L{layer}"])
        assert image.shape == (height, width, 4)
        assert image[..., :3].std() > 0.05

    tables = files["ngrams"].read_text()
    for layer in layers:
        for order in cfg.engram.orders:
            assert f"## Layer {layer}, {order}-grams" in tables
    rows = re.findall(r"^\| `(.+)` \| ([0-9.]+) \| (\d+) \|$", tables, flags=re.M)
    assert len(rows) == 2 * 5 * len(layers) * len(cfg.engram.orders)
    assert all(0.0 <= float(mean) <= 1.0 and int(count) >= viz.MIN_COUNT for _, mean, count in rows)
    highest = [float(mean) for _, mean, _ in rows[:5]]
    assert highest == sorted(highest, reverse=True)

    logged = list((out / "wandb").glob("offline-run-*/files/media/images/engram/gate_L*.png"))
    assert len(logged) == len(layers)


def test_run_without_engram_is_a_one_line_error(tmp_path, wikitext_small, one_thread, tiny_run, capsys):
    tiny_run(tmp_path, wikitext_small, tmp_path / "run", "+experiment=baseline")
    with pytest.raises(SystemExit) as exit_info:
        viz.main([str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Engram module" in err


def test_unsafe_checkpoint_is_refused_and_never_runs(engram_run, tmp_path, poison, capsys):
    """viz and eval load through checkpoint.load_checkpoint (weights_only=True): the payload never runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(engram_run, run_dir, ignore=shutil.ignore_patterns("viz"))
    marker = tmp_path / "created-by-the-pickle"
    poison(run_dir / "checkpoints" / "last.ckpt", marker)
    for main in (viz.main, eval_cli.main):
        with pytest.raises(SystemExit) as exit_info:
            main([str(run_dir)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} is refused: it holds more than weights" in err
    assert not marker.exists()
