"""From a validated request to a running Answer: the prompt through the
model's template (or as plain text), max_tokens within the ring's context,
and the engine's admission, whose refusals become HTTP errors."""

from __future__ import annotations

from typing import Optional, Sequence

import anyio

from clusterd.coordinator.generation import GenerationError, GenerationRequest, Sampling
from clusterd.serve.answer import Answer, Job
from clusterd.serve.body import read_json
from clusterd.serve.errors import bad_request, from_generation_error, validated
from clusterd.serve.router import Served


async def accept(request, model) -> tuple:
    """The body as a `model` (a 400 naming the field), the model it names
    (a 404), and its own checks of what cannot be honoured (a 400):
    (app state, request, Served)."""
    state = request.app.state
    req = validated(model, await read_json(request, state.config.limits))
    served = state.router.get(req.model)
    req.check()
    return state, req, served


def _limit(served: Served, prompt_tokens: int, asked: Optional[int], cap: Optional[int]) -> int:
    """max_tokens as asked; when not asked, what is left of the context
    (at most `cap`). A prompt that leaves no room is refused by the engine,
    with the numbers."""
    if asked is not None:
        return asked
    room = served.engine.context - prompt_tokens
    return max(1, min(room, cap) if cap else room)


def chat_job(served: Served, messages: Sequence[dict], *, max_tokens: Optional[int],
             sampling: Sampling, stops: Sequence[str], cap: Optional[int]) -> Job:
    chat = served.engine.chat
    prompt = chat.prompt(list(messages))
    request = GenerationRequest(prompt.ids, _limit(served, len(prompt.ids), max_tokens, cap),
                                sampling, tuple(chat.stop_ids))
    return Job(request, tuple(stops), split_reasoning=True, starts_inside=prompt.opens_reasoning)


def text_job(served: Served, text: str, *, max_tokens: Optional[int], sampling: Sampling,
             stops: Sequence[str], cap: Optional[int]) -> Job:
    """A plain completion: the text tokenized as is, the output as it comes."""
    chat = served.engine.chat
    ids = tuple(chat.encode_text(text))
    request = GenerationRequest(ids, _limit(served, len(ids), max_tokens, cap), sampling,
                                tuple(chat.stop_ids))
    return Job(request, tuple(stops))


async def start(served: Served, build, *args, **kwargs) -> Answer:
    """Build the job off the event loop (a long prompt takes a while to
    tokenize) and submit it; admission errors raise as ApiErrors."""
    job = await anyio.to_thread.run_sync(lambda: build(served, *args, **kwargs))
    if not job.request.prompt:
        raise bad_request("the prompt is empty", "prompt")
    try:
        return Answer(served.engine, job)
    except GenerationError as e:
        raise from_generation_error(e) from None
