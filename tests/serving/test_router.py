"""Two models behind one server (`--also`): each request is answered by the
model it names, checked against mlx-lm on that model; /health reports
every stage of both."""

from serving import rawhttp
from serving.conftest import QUESTION, concurrently

ASK = [{"role": "user", "content": QUESTION}]


def test_each_request_is_answered_by_the_model_it_names(serving, openai_client, ollama_client):
    r1, distill = serving.r1, serving.distill
    expected = {m.name: m.chat_reference(ASK, 16) for m in (r1, distill)}
    assert expected[r1.name][:2] != expected[distill.name][:2]  # the models do differ
    for m in (r1, distill):
        reasoning, content, tokens, prompt_len = expected[m.name]
        reply = openai_client.chat.completions.create(model=m.name, messages=ASK, max_tokens=16,
                                                      temperature=0)
        assert reply.model == m.name
        assert (reply.choices[0].message.model_extra["reasoning_content"],
                reply.choices[0].message.content) == (reasoning, content)
        assert reply.usage.completion_tokens == len(tokens)
        o = ollama_client.chat(model=f"{m.name}:latest", messages=ASK,
                               options={"temperature": 0, "num_predict": 16})
        assert (o.message.thinking or "", o.message.content) == (reasoning, content)


def test_both_models_at_once(serving, openai_client):
    models = (serving.r1, serving.distill)
    expected = [m.chat_reference(ASK, 20)[:2] for m in models]

    def ask(m):
        msg = openai_client.chat.completions.create(
            model=m.name, messages=ASK, max_tokens=20, temperature=0).choices[0].message
        return msg.model_extra["reasoning_content"], msg.content

    assert concurrently(*(lambda m=m: ask(m) for m in models)) == expected


def test_health_reports_every_stage_of_both_models(serving):
    reply = rawhttp.get(serving.server.port, "/health")
    assert reply.status == 200
    body = reply.json()
    assert body["status"] == "ok"
    rows = {row["model"]: row for row in body["models"]}
    assert set(rows) == {serving.r1.name, serving.distill.name}
    a = serving.cluster.addresses
    assert [s["address"] for s in rows[serving.r1.name]["stages"]] == a[:2]
    assert [s["address"] for s in rows[serving.distill.name]["stages"]] == a[2:]
    assert all(s["state"] == "ready" for row in rows.values() for s in row["stages"])
