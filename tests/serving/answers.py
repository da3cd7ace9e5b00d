"""Asking a served model for a chat answer with the `openai` client, and
asking again until a ring that went down is back."""

import time

import openai

from serving.conftest import QUESTION

ASK = [{"role": "user", "content": QUESTION}]
BACK_WITHIN_S = 90.0


def client(url: str) -> openai.OpenAI:
    from serving.serverproc import KEY

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def answer(c: openai.OpenAI, name: str, max_tokens: int = 8) -> tuple[str, str]:
    """(reasoning, content) of a greedy answer, as Model.chat_reference has them."""
    reply = c.chat.completions.create(model=name, messages=ASK, max_tokens=max_tokens,
                                      temperature=0)
    assert reply.model == name
    msg = reply.choices[0].message
    return (msg.model_extra or {}).get("reasoning_content") or "", msg.content


def answer_when_back(c: openai.OpenAI, name: str) -> tuple[str, str]:
    """Ask until the model answers (a 503 while its ring re-forms)."""
    deadline = time.monotonic() + BACK_WITHIN_S
    while True:
        try:
            return answer(c, name)
        except openai.APIStatusError as e:
            if e.status_code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(1.0)
