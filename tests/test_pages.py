"""The tables on the project's pages equal the committed CSVs they are read from.

A page's table is copied from a run's files by hand, so a table or page that was remade without
the other would show numbers no run produced. These tests read the committed files only.
"""

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Table 1's columns on every page, in order: (task, metric) of results/<profile>/tables/table1_main.csv
TABLE1_COLUMNS = [
    ("heldout_lm", "loss_nats"),
    ("tiny_heldout_ppl", "bits_per_byte"),
    ("tiny_continuation", "acc_norm"),
    ("tiny_mmlu", "acc"),
]


def _rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The body rows of the first Markdown table whose header starts with `| first_cell |`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _table1(profile: str) -> dict[str, list[str]]:
    """Model -> Table 1's four values as the pages print them (3 decimals)."""
    t = pd.read_csv(ROOT / "results" / profile / "tables" / "table1_main.csv")
    t = t[t.source.str.startswith("this replication")]
    out = {}
    for model, rows in t.groupby("model"):
        by = rows.set_index(["task", "metric"]).value
        out[model] = [f"{by[c]:.3f}" for c in TABLE1_COLUMNS]
    return out


def _model(label: str) -> str:
    """`lrc (paper settings)` -> `lrc`."""
    return label.split(" ")[0]


def test_the_front_pages_main_table_is_tiny_and_cpu_fulls_table1():
    tiny, full = _table1("tiny"), _table1("cpu-full")
    rows = _rows((ROOT / "README.md").read_text(), "model")
    assert {_model(r[0]) for r in rows} == set(tiny) == set(full)
    assert tiny["teacher"] == full["teacher"]
    for label, *cells in rows:
        m = _model(label)
        # one cell per metric, tiny / cpu-full; the teacher, the same model in both, once
        want = tiny[m] if m == "teacher" else [f"{t} / {f}" for t, f in zip(tiny[m], full[m])]
        assert cells == want, (m, cells, want)


@pytest.mark.parametrize("profile", ["tiny", "cpu-full"])
def test_a_profiles_table1_is_its_csv(profile):
    expected = _table1(profile)
    rows = _rows((ROOT / "results" / profile / "README.md").read_text(), "model")
    assert {_model(r[0]) for r in rows} == set(expected)
    for label, *cells in rows:
        assert cells == expected[_model(label)], (profile, label, cells)


def test_the_tiny_pages_claims_are_its_claims_csv():
    claims = pd.read_csv(ROOT / "results" / "tiny" / "tables" / "claims.csv")
    rows = _rows((ROOT / "results" / "tiny" / "README.md").read_text(), "claim")
    assert [tuple(r) for r in rows] == list(claims[["claim", "measured_here", "verdict"]].itertuples(False, None))


def test_the_front_pages_gpu_table_is_its_csv():
    t = pd.read_csv(ROOT / "results" / "paper-1.5b" / "tables" / "table8_throughput_b3x8_paired.csv")
    t = t.set_index(["method", "compiled"])
    rows = _rows((ROOT / "README.md").read_text(), "method")
    assert len(rows) == 3
    for label, eager, compiled, _ratio, mfu in rows:
        m = _model(label)
        assert eager == f"{t.loc[(m, False), 'tokens_per_s']:,.0f}", (m, eager)
        assert compiled == f"{t.loc[(m, True), 'tokens_per_s']:,.0f}", (m, compiled)
        assert mfu == f"{t.loc[(m, True), 'mfu']:.3f}", (m, mfu)
    lrc = re.search(r"\| lrc \|[^|]*\|[^|]*\| ([\d.]+) / ([\d.]+) \|", (ROOT / "README.md").read_text())
    assert lrc.groups() == tuple(f"{t.loc[('lrc', c), 'over_bound_paired_median']:.3f}" for c in (False, True))
