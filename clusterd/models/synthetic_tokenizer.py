"""An offline R1-style tokenizer for synthetic models.

No tokenizer can be downloaded in CI, so a small byte-level BPE is trained with the
`tokenizers` package on a fixed corpus, given the R1 special tokens (BOS id 0, EOS id 1
as in DeepSeek-R1) and padded with R1-style placeholder tokens up to the model's
vocab_size, so that every id a random model can sample decodes.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
THINK_START = "<think>"
THINK_END = "</think>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# After the BPE vocabulary, in R1's order. The flag is `special` as in R1's
# tokenizer.json: chat-structure tokens are not special there, so decoding with
# skip_special_tokens keeps them.
EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    (THINK_START, False),
    (THINK_END, False),
    ("<｜fim▁hole｜>", True),
    ("<｜fim▁begin｜>", True),
    ("<｜fim▁end｜>", True),
    (USER, False),
    (ASSISTANT, False),
    ("<|EOT|>", True),
    ("<｜tool▁calls▁begin｜>", False),
    ("<｜tool▁calls▁end｜>", False),
    ("<｜tool▁call▁begin｜>", False),
    ("<｜tool▁call▁end｜>", False),
    ("<｜tool▁outputs▁begin｜>", False),
    ("<｜tool▁outputs▁end｜>", False),
    ("<｜tool▁output▁begin｜>", False),
    ("<｜tool▁output▁end｜>", False),
    ("<｜tool▁sep｜>", False),
)

# Trained merges beyond this add nothing but training time: the corpus is small.
MAX_BPE_VOCAB = 4096

TEMPLATE_NAME = "deepseek-r1.jinja"

# Fixed training text: plain English, numbers, Python-like code and a chat. Changing it
# changes every synthetic tokenizer, so bump synthetic.FORMAT_VERSION when you do.
CORPUS = r'''
A cluster of small computers can do together what none of them can do alone. The largest
open models no longer fit in the memory of a single machine, but their layers can be split
into stages, and each stage can live on a different computer. The first machine embeds the
tokens of the prompt and runs the first few layers; it sends the hidden state to the next
machine, which runs its own layers, and so on, until the last machine applies the final norm
and the output head, and picks the next token. Then the new token goes back to the start.

Memory is the hard limit. A model with six hundred and seventy-one billion parameters needs
about three hundred and eighty gigabytes at four bits per weight, plus room for the key and
value cache of every layer. Bandwidth matters less than you would think: one decode step
sends a single vector of seven thousand numbers from one stage to the next. Latency matters
more, because every hop waits for the one before it.

The weather was cold and clear that morning. She walked to the station, bought a coffee and
a newspaper, and read about the election while the train crossed the river. The city looked
quiet under a thin layer of snow; the trees in the park were white, and children were
already building a snowman near the old fountain. At the office, the heating was broken
again, so everyone kept their coats on and talked about the weekend.

Why is the sky blue? Sunlight is made of many colours. When it passes through the air, the
short blue waves are scattered much more than the long red ones, so blue light reaches our
eyes from every direction. At sunset the light travels through more air, most of the blue is
scattered away, and the sky turns orange and red.

Question: What is 17 times 23? Answer: 17 * 23 = 391. Question: Is 97 a prime number?
Answer: yes, 97 has no divisors other than 1 and itself. The numbers 0, 1, 2, 3, 4, 5, 6, 7,
8, 9, 10, 42, 100, 256, 1024, 4096, 65536 and 3.14159 appear in many programs.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Stage:
    def __init__(self, start: int, stop: int, device: str = "cpu") -> None:
        self.start = start
        self.stop = stop
        self.device = device

    def __repr__(self) -> str:
        return f"Stage(start={self.start}, stop={self.stop}, device={self.device!r})"


for i, stage in enumerate(plan.stages):
    print(f"stage {i}: layers [{stage.start}, {stage.stop}) on {stage.host}:{stage.port}")
    if stage.memory_bytes > limit:
        raise ValueError("the stage does not fit in memory")

{"model": "deepseek-r1", "quant": "4bit", "nodes": ["studio-1", "studio-2", "mini-3"], "ok": true}

$ clusterd up --port 50051
$ clusterd plan deepseek-r1 --quant 4bit --context 8192
$ git commit -m "Fix the off-by-one error in the layer split"

User: Can you explain what a hash table is?
Assistant: <think>
The user wants a simple explanation. I should mention keys, values and the hash function.
</think>
A hash table stores values under keys. A hash function turns each key into an index in an
array, so that looking a value up takes about the same time no matter how many items there
are. When two keys land on the same index, the table keeps both, for example in a short list.
'''


def _chat_template() -> str:
    return resources.files("clusterd.models").joinpath("templates", TEMPLATE_NAME).read_text(
        encoding="utf-8"
    )


def _corpus_lines() -> list[str]:
    # One sample per paragraph keeps training input identical whatever the platform.
    return [p for p in CORPUS.split("\n\n") if p.strip()]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens with R1's special tokens."""
    n_fixed = 3 + len(EXTRA_TOKENS)
    # 256 byte symbols + the three leading specials must fit below the extra tokens.
    if vocab_size < n_fixed + 259:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size - len(EXTRA_TOKENS), MAX_BPE_VOCAB),
        # Trainer specials come first, which puts BOS at id 0 and EOS at id 1 as in R1.
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in EXTRA_TOKENS]
    )
    # Pad so that every row of the embedding and head has a decodable token; R1 itself
    # uses these placeholder names for its unused ids.
    n_fill = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens(
        [
            AddedToken(f"<｜place▁holder▁no▁{i}｜>", special=True, normalized=False)
            for i in range(n_fill)
        ]
    )
    # R1's tokenizer prepends BOS when encoding with special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, 0)],
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tokenizer padding went wrong")
    return tok


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer_files(path: Path, vocab_size: int, model_max_length: int = 16384) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json the way the R1 repository has them."""
    build_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added(BOS),
        "chat_template": _chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added(EOS),
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": _added(EOS),
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }
    special_map = {
        "bos_token": {k: v for k, v in _added(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in _added(EOS).items() if k != "__type"},
        "pad_token": {k: v for k, v in _added(EOS).items() if k != "__type"},
    }
    generation_config = {
        "_from_model_config": True,
        "bos_token_id": 0,
        "do_sample": True,
        "eos_token_id": 1,
        "temperature": 0.6,
        "top_p": 0.95,
    }
    for name, data in (
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_map),
        ("generation_config.json", generation_config),
    ):
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        (path / name).write_text(text, encoding="utf-8")
