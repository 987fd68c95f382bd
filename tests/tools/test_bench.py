"""ratel/tools/bench.py: what the benchmarks share."""
from ratel.tools.bench import publish


def test_publish_prints_the_table_and_appends_it_after_what_the_file_holds(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    publish("## First\n\n| a |\n|---|\n", results)
    publish("\n## Second\n| b |\n\n", str(results))
    assert results.read_text() == "# Benchmark results\n\n## First\n\n| a |\n|---|\n\n## Second\n| b |\n"
    assert "## First" in capsys.readouterr().out


def test_publish_without_a_file_only_prints(tmp_path, capsys):
    publish("| c |", None)
    assert capsys.readouterr().out == "| c |\n" and not list(tmp_path.iterdir())
