"""The pure parts of `clusterd serve`: the reasoning parser and the stop
matcher give the same result however the text is cut into pieces; the
JSON depth check; chat templates that open the reasoning or not."""

import json
import shutil

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clusterd.coordinator.chat import Chat, template_messages
from clusterd.serve.body import json_depth
from clusterd.serve.reasoning import ReasoningParser
from clusterd.serve.stops import StopMatcher

R1_OUTPUT = ("Okay, the user asks why the sky is blue. </thi is not the end; < and </ neither.\n"
             "Rayleigh scattering: shorter wavelengths scatter more.\n\n</think>\n\n"
             "The sky is blue because air scatters blue light more than red. "
             "(</think> again is just text.)")
REASONING = ("Okay, the user asks why the sky is blue. </thi is not the end; < and </ neither.\n"
             "Rayleigh scattering: shorter wavelengths scatter more.")
CONTENT = "The sky is blue because air scatters blue light more than red. (</think> again is just text.)"


def parse(pieces, starts_inside):
    parser = ReasoningParser(starts_inside)
    reasoning, content = "", ""
    for p in pieces:
        r, c = parser.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


def test_whole_text_splits_at_the_first_close():
    assert parse([R1_OUTPUT], True) == (REASONING, CONTENT)


@pytest.mark.parametrize("text, inside, expected", [
    ("plain answer, no reasoning", False, ("", "plain answer, no reasoning")),
    ("  \n<think>\nhmm\n</think>\n\nyes", False, ("hmm", "yes")),
    ("answer <think>later</think>", False, ("", "answer <think>later</think>")),
    ("<thi", False, ("", "<thi")),
    ("  ", False, ("", "  ")),
    ("never closes\n", True, ("never closes", "")),
    ("\n\n</think>only an answer", True, ("", "only an answer")),
    ("", True, ("", "")),
    ("reason </thin", True, ("reason </thin", "")),
])
def test_edge_cases(text, inside, expected):
    assert parse([text], inside) == expected


def test_every_two_way_cut_gives_the_same_split():
    for text, inside in ((R1_OUTPUT, True), ("\n<think>\na\n</think>\n\nb", False)):
        whole = parse([text], inside)
        for i in range(len(text) + 1):
            assert parse([text[:i], text[i:]], inside) == whole, i


def test_character_by_character():
    assert parse(list(R1_OUTPUT), True) == (REASONING, CONTENT)


def test_cut_at_every_token_boundary(synthetic):
    """R1-style output as the synthetic R1 tokenizer cuts it, detokenized
    token by token as the server does."""
    chat = Chat(synthetic("deepseek_v3", "tiny"))
    ids = chat.tokenizer.encode(R1_OUTPUT, add_special_tokens=False)
    think_end = chat.tokenizer.convert_tokens_to_ids("</think>")
    assert think_end in ids  # `</think>` is one token, as in R1
    pieces = list(chat.stream_pieces(ids))
    assert "".join(pieces) == R1_OUTPUT
    assert parse(pieces, True) == (REASONING, CONTENT)
    for i in range(1, len(pieces)):  # and joined at every boundary
        assert parse(["".join(pieces[:i]), "".join(pieces[i:])], True) == (REASONING, CONTENT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(R1_OUTPUT)), max_size=12), st.booleans())
def test_any_cuts_give_the_same_split(cuts, inside):
    text = R1_OUTPUT if inside else "<think>" + R1_OUTPUT
    points = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert parse(pieces, inside) == (REASONING, CONTENT)


def stopped(pieces, stops):
    m = StopMatcher(stops)
    out = ""
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            return out, True
    return out + m.finish(), False


@settings(max_examples=300, deadline=None)
@example(" aa", ["a", " aa"], [2])  # a longer stop that starts earlier completes later
@given(st.text("ab\n ", max_size=30), st.lists(st.text("ab\n ", min_size=1, max_size=4),
                                               min_size=1, max_size=3),
       st.lists(st.integers(0, 30), max_size=8))
def test_stops_any_cuts(text, stops, cuts):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[:min(hits)], True) if hits else (text, False)
    points = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert stopped(pieces, stops) == expected


def test_a_stop_spanning_pieces_is_not_shown():
    assert stopped(["The sky is bl", "ue because", " air"], ["blue"]) == ("The sky is ", True)
    assert stopped(["x\n", "\nUser:"], ["\n\n"]) == ("x", True)
    assert stopped(["almost blu", "r"], ["blue"]) == ("almost blur", False)


@pytest.mark.parametrize("raw, depth", [
    (b"{}", 1), (b"[]", 1), (b"1", 0), (b'"[[[["', 0), (b'{"a": [[1], {"b": []}]}', 4),
    (b'{"a": "\\"[[[", "b": [1]}', 2), (b"[" * 1000 + b"]" * 1000, 1000),
    (b'["\\\\", [[]]]', 3),
])
def test_json_depth(raw, depth):
    assert json_depth(raw) == depth
    if depth < 100:
        obj = json.loads(raw)

        def real(o):
            if isinstance(o, dict):
                return 1 + max(map(real, o.values()), default=0)
            if isinstance(o, list):
                return 1 + max(map(real, o), default=0)
            return 0
        assert real(obj) == depth


def test_template_messages():
    sent = [{"role": "system", "content": "A."}, {"role": "developer", "content": "B."},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "<think>\nr\n</think>\n\nans"}]
    assert template_messages(sent) == [{"role": "system", "content": "A.\n\nB."},
                                       {"role": "user", "content": "Q"},
                                       {"role": "assistant", "content": "\n\nans"}]


def test_a_template_that_does_not_open_the_reasoning(synthetic, tmp_path):
    model = synthetic("qwen2", "tiny")
    assert Chat(model).prompt([{"role": "user", "content": "hi"}]).opens_reasoning
    copy = tmp_path / "no-think"
    shutil.copytree(model, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<think>\\n", "")
    assert "<think>\\n" not in config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    prompt = Chat(copy).prompt([{"role": "user", "content": "hi"}])
    assert not prompt.opens_reasoning
    assert Chat(copy).tokenizer.decode(list(prompt.ids)).endswith("<｜Assistant｜>")
