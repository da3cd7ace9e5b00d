"""Every node of a ring dies (SIGKILL), the nodes come back on the same
ports, and `clusterd serve` answers again by itself: no restart of serve,
the engine re-forms its ring from its --peer list. Meanwhile each request
is a 503 naming the nodes. Answers before and after match mlx-lm."""

from clusterd.local_cluster import LocalCluster
from serving import rawhttp
from serving.answers import ASK, answer, answer_when_back, client
from serving.conftest import Model
from serving.serverproc import start_serve


def test_serve_comes_back_after_every_node_died(synthetic, tmp_path):
    model = Model(synthetic("qwen2", "tiny"))
    expected = model.chat_reference(ASK, 8)[:2]
    with LocalCluster(2, workdir=tmp_path / "nodes", prefix="back") as cluster:
        # --split: a stage on each node (the planner would put this model on one).
        server = start_serve(model.path, cluster.addresses, tmp_path / "serve.log",
                             "--context", "512", "--split", "2,2")
        try:
            c = client(server.url)
            assert answer(c, model.name) == expected
            for node in cluster.nodes:
                node.proc.kill()
                node.proc.wait()
            for _ in range(2):  # the one that finds the ring gone, and the next
                reply = rawhttp.post(server.port, "/v1/chat/completions",
                                     {"model": model.name, "messages": ASK, "max_tokens": 4})
                assert reply.status == 503, reply.body
                assert "back0" in reply.message and "back1" in reply.message, reply.message
            for i in range(2):
                cluster.restart(i)
            assert answer_when_back(c, model.name) == expected
            assert server.proc.poll() is None
        finally:
            assert server.stop() == 0, server.log()
