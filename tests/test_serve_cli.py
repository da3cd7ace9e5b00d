"""`clusterd serve --also` refuses what it cannot place before it contacts
any node: several nodes after @ (a forced model goes on one node), and
--split beside an --also model (the planner places both)."""

from click.testing import CliRunner

from clusterd.cli import main


def serve(*args):
    return CliRunner().invoke(main, ["serve", *args, "--peer", "127.0.0.1:1"])


def test_also_on_several_nodes_is_refused(synthetic):
    model = synthetic("qwen2", "tiny")
    result = serve(str(model), "--also", f"{model}@a,b")
    assert result.exit_code == 2
    assert "give one node after @" in result.output and "--also-peer" in result.output
    assert "127.0.0.1:1" not in result.output  # no node was asked


def test_split_beside_an_also_model_is_refused(synthetic):
    model = synthetic("qwen2", "tiny")
    result = serve(str(model), "--split", "2,2", "--also", str(synthetic("llama", "tiny")))
    assert result.exit_code == 2
    assert "--split forces one model's layers" in result.output
    assert "127.0.0.1:1" not in result.output
