"""`clusterd serve` refuses an --also model without nodes of its own
before it contacts any node."""

from click.testing import CliRunner

from clusterd.cli import main


def test_also_needs_its_own_nodes(synthetic):
    model = synthetic("qwen2", "tiny")
    result = CliRunner().invoke(main, ["serve", str(model), "--peer", "127.0.0.1:1",
                                       "--also", str(model)])
    assert result.exit_code == 2
    assert "say which nodes hold it" in result.output
    assert "127.0.0.1:1" not in result.output  # no node was asked

