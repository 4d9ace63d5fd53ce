"""The TinyLlama-scale rehearsal (`make rehearse`): every stage passes at the real shape, within 24 GiB."""
import pytest

from tsparse import rehearse
from tsparse.stages import run_stage, stage_table


@pytest.mark.slow
def test_rehearsal_at_tinyllama_shape(tmp_path, capsys):
    stages = rehearse.main(["--work", str(tmp_path / "work")])
    assert [s.name for s in stages] == ["base (random init)", "train diff_lr 3 steps", "export", "reload + generate",
                                        "lm_eval --limit 2"]
    assert all(s.ok for s in stages) and max(s.peak_rss for s in stages) < 24 * 2**30
    assert "generation identical" in next(s.note for s in stages if s.name == "reload + generate")
    assert "| lm_eval --limit 2 | ok |" in capsys.readouterr().out


@pytest.mark.slow
def test_sharded_rehearsal_on_two_ranks(tmp_path, capsys):
    """2 CPU ranks, sharded bf16 tables (262K experts), a bf16 base: 3 steps, both exports (gathered at the end
    of training, and `tsparse.export` from the sharded checkpoint) generate the run dir's greedy tokens."""
    stages = rehearse.main(["--ranks", "2", "--work", str(tmp_path / "work")])
    assert [s.name for s in stages] == [
        "base (random init)", "train diff_lr 3 steps on 2 ranks, tables sharded", "export", "reload + generate",
        "reload + generate (the export at the end of training)", "lm_eval --limit 2"]
    assert all(s.ok for s in stages) and max(s.peak_rss for s in stages) < 24 * 2**30
    assert all("generation identical" in s.note for s in stages if s.name.startswith("reload + generate"))
    assert list((tmp_path / "work" / "run" / "checkpoints").glob("last.ckpt.tables-*"))  # rows written by DCP


def test_stage_reports_failure_and_peak_rss(tmp_path):
    ok = run_stage("ok", ["-c", "x = bytearray(200 << 20); print('done')"], tmp_path)
    bad = run_stage("bad", ["-c", "raise SystemExit(3)"], tmp_path)
    assert ok.ok and ok.note == "done" and ok.peak_rss > 200 << 20
    assert not bad.ok and "| bad | FAILED |" in stage_table([ok, bad])
