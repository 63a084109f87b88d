"""tools/claims.py: every measured figure in README.md and docs/*.md names its source (CI runs this file)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("llmops_tools_claims", ROOT / "tools" / "claims.py")
claims = sys.modules.setdefault("llmops_tools_claims", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(claims)


def _flagged(tmp_path, text):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return [numbers for _, numbers in claims.unsourced([doc])]


def test_the_docs_have_no_unsourced_figure():
    found = claims.unsourced([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert found == [], "\n".join(f"{b.path}:{b.line}: {', '.join(n)}" for b, n in found)


def test_the_command_fails_on_an_unsourced_figure(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("The default trained at 98.0 samples/s, 26.3x the reference.\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "claims.py"), str(doc)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "98.0 samples/s" in run.stdout and "26.3x" in run.stdout


def test_a_figure_needs_a_committed_file_or_command_in_its_block(tmp_path):
    assert _flagged(tmp_path, "A step took 0.42 s and the loss was 8.316.\n") == [["0.42 s", "8.316"]]
    assert _flagged(tmp_path, "A step took 0.42 s (`bench/results/controlplane.json`).\n") == []
    assert _flagged(tmp_path, "A step took 0.42 s (`training_recipe.json`).\n") == []
    assert _flagged(tmp_path, "A step took 0.42 s (`bench/results/no-such-run.json`).\n") == [["0.42 s"]]
    # a source two paragraphs away does not count
    assert _flagged(tmp_path, "From `bench/results/controlplane.json`.\n\nA step took 0.42 s.\n") == [["0.42 s"]]


def test_a_removed_result_file_counts_only_with_a_commit_that_holds_history(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert _flagged(tmp_path, f"It ran at 33.81 samples/s (`bench/results/gone.json`, {head}).\n") == []
    assert _flagged(tmp_path, "It ran at 33.81 samples/s (`bench/results/gone.json`, 0000000).\n") == [["33.81 samples/s"]]


def test_tables_and_lists_take_the_source_of_the_paragraph_above(tmp_path):
    table = "Measured (`bench/results/controlplane.json`):\n\n| what | value |\n|---|---|\n| p99 | 0.75 s |\n"
    assert _flagged(tmp_path, table) == []
    assert _flagged(tmp_path, table.replace("(`bench/results/controlplane.json`)", "")) == [["0.75 s"]]
    items = "Profile (`bench/results/training_recipe.json`):\n\n* GPU 0.163 s\n* host 0.045 s\n"
    assert _flagged(tmp_path, items) == []
    assert _flagged(tmp_path, "Profile:\n\n* GPU 0.163 s\n") == [["0.163 s"]]


def test_versions_dates_code_and_machine_shapes_are_not_figures(tmp_path):
    text = ("Ray 2.57.0 with vLLM 0.25.1 and transformers 5.17 on 2026-12-03, on 2 cores and an L4 (24 GiB);\n"
            "`timeout 600s` and the code below are not prose.\n\n```\nsleep 30s\n```\n")
    assert _flagged(tmp_path, text) == []
