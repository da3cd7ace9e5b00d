"""A ring that loses its node: a streamed answer already under way ends
with an error event and [DONE] (so the `openai` client raises), the next
request is a 503 naming the node, and so is /health. A server
of its own, since it ends with no node alive."""

import json

import httpx
import openai
import pytest

from clusterd.local_cluster import LocalCluster
from serving import rawhttp
from serving.conftest import QUESTION
from serving.serverproc import KEY, start_serve

ASK = [{"role": "user", "content": QUESTION}]


class Recorder(httpx.BaseTransport):
    """httpx's transport, keeping the raw bytes of every response body, also
    what the client leaves unread when it stops (to see the stream's end)."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.raw = bytearray()

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        stream, raw = response.stream, self.raw

        class Tee(httpx.SyncByteStream):
            def __iter__(self):
                for chunk in stream:
                    raw.extend(chunk)
                    yield chunk

            def close(self):
                for chunk in stream:
                    raw.extend(chunk)
                stream.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Tee(),
                              extensions=response.extensions)


@pytest.fixture(scope="module")
def lonely(synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lonely")
    model = synthetic("qwen2", "tiny")
    with LocalCluster(1, workdir=tmp / "nodes", prefix="lonely") as cluster:
        server = start_serve(model, cluster.addresses, tmp / "serve.log", "--context", "1024")
        try:
            yield server, cluster, model.name
        finally:
            assert server.stop() == 0, server.log()


def test_losing_the_only_node(lonely):
    server, cluster, name = lonely
    assert rawhttp.get(server.port, "/health").status == 200
    recorder = Recorder()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(transport=recorder, timeout=60))
    stream = client.chat.completions.create(model=name, messages=ASK, max_tokens=900,
                                            temperature=0, stream=True)
    got = 0
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            got += 1
            if got == 3:
                cluster.nodes[0].proc.kill()
    assert "lonely0" in e.value.message
    events = [line[len("data: "):] for line in recorder.raw.decode().split("\n\n")
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "lonely0" in error["message"] and error["type"] == "server_error"
    assert all("choices" in json.loads(ev) for ev in events[:-2])

    reply = rawhttp.post(server.port, "/v1/chat/completions",
                         {"model": name, "messages": ASK, "max_tokens": 4})
    assert reply.status == 503 and "lonely0" in reply.message
    health = rawhttp.get(server.port, "/health")
    assert health.status == 503
    assert health.json()["failing"] == ["lonely0"] and "lonely0" in health.json()["message"]
    assert server.proc.poll() is None
