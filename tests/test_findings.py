"""Every measured number in docs/results.md's Findings table comes from tool output under docs/results/:
a report CSV or report.md, a bench output, or a run's base_results.json. Numbers with a decimal point
are checked (integers there are counts: seeds, steps, experts); each must equal some output value at
its printed precision."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NUMBER = re.compile(r"\d[\d,]*\.\d+")
OUTPUTS = ("report.csv", "report.md", "bench.csv", "bench.md", "bench.json", "base_results.json")


def findings_evidence(text: str) -> list[str]:
    """The evidence columns (the third and the fourth, other bases) of every row of the Findings table."""
    section = text.split("## Findings", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| seed claim")]
    return [" | ".join(line.split(" | ")[2:4]) for line in rows]


def output_values() -> list[float]:
    files = [p for name in OUTPUTS for p in (DOCS / "results").rglob(name)]
    assert files, "no report or bench output under docs/results"
    return [abs(float(n.replace(",", ""))) for p in files for n in re.findall(r"\d[\d,]*\.?\d*(?:e-?\d+)?",
                                                                              p.read_text())]


def unsupported(evidence: list[str], values: list[float]) -> list[str]:
    missing = []
    for cell in evidence:
        for token in NUMBER.findall(cell):
            decimals = len(token.split(".")[1])
            value = float(token.replace(",", ""))
            if not any(abs(v - value) <= 0.5 * 10 ** -decimals + 1e-12 for v in values):
                missing.append(token)
    return missing


def test_every_number_in_the_findings_comes_from_a_report_or_bench_output():
    evidence = findings_evidence((DOCS / "results.md").read_text())
    assert len(evidence) >= 10 and sum(len(NUMBER.findall(c)) for c in evidence) >= 30
    assert unsupported(evidence, output_values()) == []


@pytest.mark.parametrize("typed", ["85.95", "0.0594", "2,999.5"])
def test_a_number_typed_by_hand_is_caught(typed):
    assert unsupported([f"engram {typed} ± 0.03"], [85.9412, 0.0301, 0.05931, 2999.2]) == [typed]
