"""tsparse.gpu_check refuses to run without CUDA: one `error:` line, exit 2, nothing started."""
import pytest
import torch

from tsparse import gpu_check


def test_without_cuda_it_exits_2_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--work", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "CUDA" in err, err
    assert not (tmp_path / "work").exists()


def test_bad_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--experts", "0"])
    assert exit_info.value.code == 2 and "--experts: '0' is not a positive integer" in capsys.readouterr().err
