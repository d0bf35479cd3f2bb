"""The README's hardening figures are the sizes of the battery that CI runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def module(relative: str) -> ast.Module:
    return ast.parse((ROOT / relative).read_text(encoding="utf-8"))


def constant(tree: ast.Module, name: str) -> object:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            return ast.literal_eval(node.value)
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
        ):
            assert node.value is not None
            if isinstance(node.value, ast.Dict):
                return len(node.value.keys)
            return ast.literal_eval(node.value)
    raise AssertionError(f"no constant {name}")


def calls(tree: ast.Module, name: str) -> int:
    return sum(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
        for node in ast.walk(tree)
    )


def battery_row(what: str) -> int:
    text = README.read_text(encoding="utf-8")
    section = text.split("### The hardening battery", 1)[1].split("\n### ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {what}"))
    return int(row.split("|")[2].strip().replace(",", ""))


def test_fuzz_sizes_match_the_tests() -> None:
    """The README's fuzzed-connection counts are the seeded storms' sizes."""
    bad_input = module("tests/integration/test_cluster_bad_input.py")
    wire = module("tests/runtime/test_wire_fuzz.py")
    assert battery_row("malformed connections against a real") == constant(
        bad_input, "FUZZ_CONNECTIONS"
    )
    assert battery_row("malformed connections against the wire") == constant(wire, "CONNECTIONS")


def test_refused_spec_and_cli_counts_match_the_tables() -> None:
    """The README's refused-spec and CLI-case counts are the sizes of the test tables."""
    bad_input = module("tests/integration/test_cluster_bad_input.py")
    assert battery_row("invalid spec files") == constant(bad_input, "INVALID_SPECS")
    assert battery_row("bad-input cases") == calls(
        module("tests/integration/test_cli_errors.py"), "Case"
    )


def test_every_journal_damage_kind_has_a_test() -> None:
    """Each kind of journal damage the README lists is exercised by a named test or case."""
    integrity = (ROOT / "tests/persistence/test_sqlite_integrity.py").read_text(encoding="utf-8")
    cli = (ROOT / "tests/integration/test_cli_errors.py").read_text(encoding="utf-8")
    evidence = {
        "a flipped byte in a payload": "def test_a_flipped_byte_in_a_payload",
        "in a stream id": "def test_a_flipped_byte_in_a_stream_id",
        "in a snapshot": "def test_a_damaged_snapshot",
        "a damaged tail": "def test_opening_for_writing_refuses_a_damaged_tail",
        "a missing checksum": "def test_a_missing_checksum_is_damage",
        "a missing event": "def test_check_finds_a_missing_event",
        "a broken index": "and_a_broken_index",
        "a truncated file": "def test_check_reports_a_truncated_journal",
        "a file that is not a journal": "def test_check_refuses_what_is_not_a_journal",
        "a newer schema": '"serve-newer-schema"',
        "a directory": '"serve-directory"',
        "a garbage WAL": "def test_a_garbage_wal_is_ignored_but_reported",
    }
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| kinds of journal damage"))
    listed = re.search(r"\((.*)\)", row)
    assert listed is not None
    for kind in evidence:
        assert kind in listed.group(1), kind
    assert battery_row("kinds of journal damage") == len(evidence)
    for kind, marker in evidence.items():
        assert marker in integrity or marker in cli, f"no test for {kind}"
