"""docs/fidelity.md says what the simulator does: its table is regenerated and compared."""

from __future__ import annotations

from simulator.fidelity import DOC, current, rows, table


def test_the_fidelity_table_in_the_docs_is_what_the_simulator_gives():
    assert current(DOC.read_text()) == table(), "run: python -m simulator.fidelity --write"


def test_every_row_names_a_source_and_a_gap():
    for row in rows():
        assert row.published and row.ours and row.gap, row
        assert row.source or row.published == "none published", row
