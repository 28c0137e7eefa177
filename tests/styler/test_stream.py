"""Streaming detokenization: UTF-8 safe, equal to a full decode, stop strings cut exactly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.styler.stream import DetokenizeSession, StreamDelta, StreamOptions
from services.styler.styler import Styler

from .helpers import load_styler, needs_shared, shared_dir, tokenizer_dirs

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz ,.!?\n") * 4
    + list("日本語中文한국어ÄÖÜßéñ")
    + ["🤖", "👍🏽", "👨‍👩‍👧", "e\u0301", "🇨🇭", "  ", "\t"]
)


def _dirs() -> list[Path]:
    stories = shared_dir() / "models" / "stories260K"
    return tokenizer_dirs() + ([stories] if (stories / "tokenizer.json").is_file() else [])


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _feed(
    session: DetokenizeSession, ids: Sequence[int], rng: random.Random, index: int = 0
) -> list[StreamDelta]:
    deltas, pos = [], 0
    while pos < len(ids):
        step = rng.randint(1, 5)
        chunk = ids[pos : pos + step]
        pos += step
        deltas.append(session.add(index, chunk, finished=pos >= len(ids)))
    if not ids:
        deltas.append(session.add(index, [], finished=True))
    return deltas


@needs_shared
@pytest.mark.parametrize("tok_dir", _dirs(), ids=lambda p: p.name)
def test_stream_concatenates_to_full_decode(tok_dir: Path) -> None:
    styler = load_styler(str(tok_dir))
    rng = random.Random(tok_dir.name)
    for trial in range(30):
        ids = styler.tokenize(_random_text(rng, rng.randint(0, 60)), add_special_tokens=trial % 2 == 0)
        skip = trial % 3 != 0
        session = styler.open_stream(StreamOptions(skip_special_tokens=skip))
        deltas = _feed(session, ids, rng)
        text = "".join(d.text for d in deltas)
        assert text == styler.detokenize(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d.text for d in deltas)
        assert deltas[-1].finished and deltas[-1].num_tokens == len(ids)


@needs_shared
@pytest.mark.parametrize("tok_dir", _dirs(), ids=lambda p: p.name)
def test_stream_of_arbitrary_ids_equals_full_decode(tok_dir: Path) -> None:
    """Random ids may not even be valid UTF-8; the concatenation still equals the full decode."""
    styler = load_styler(str(tok_dir))
    rng = random.Random(1)
    vocab = styler.info().vocab_size
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        deltas = _feed(styler.open_stream(StreamOptions()), ids, rng)
        assert "".join(d.text for d in deltas) == styler.detokenize(ids)


def _three_token_stop(styler: Styler, rng: random.Random) -> tuple[list[int], str] | None:
    ids = styler.tokenize(_random_text(rng, 80), add_special_tokens=False)
    for _ in range(20):
        i = rng.randrange(1, max(2, len(ids) - 3))
        stop = styler.detokenize(ids[i : i + 3])
        pieces = [styler.detokenize([t]) for t in ids[i : i + 3]]
        if (
            len(stop) >= 3
            and stop.strip()
            and "\ufffd" not in stop
            and all(pieces)
            and "\ufffd" not in "".join(pieces)
        ):
            return ids, stop
    return None


@needs_shared
@pytest.mark.parametrize("tok_dir", _dirs(), ids=lambda p: p.name)
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_three_tokens(tok_dir: Path, include: bool) -> None:
    styler = load_styler(str(tok_dir))
    rng = random.Random(tok_dir.name + str(include))
    checked = 0
    for _ in range(15):
        found = _three_token_stop(styler, rng)
        if found is None:
            continue
        ids, stop = found
        full = styler.detokenize(ids)
        at = full.find(stop)
        assert at >= 0
        session = styler.open_stream(
            StreamOptions(stop=("never-there", stop), include_stop_str_in_output=include)
        )
        deltas = _feed(session, ids, rng)
        text = "".join(d.text for d in deltas)
        assert text == full[: at + (len(stop) if include else 0)]
        stopped = [d for d in deltas if d.stopped]
        assert len(stopped) == 1 and stopped[0].matched_stop == stop and stopped[0].finished
        assert all(not d.text for d in deltas[deltas.index(stopped[0]) + 1 :])  # later tokens ignored
        checked += 1
    assert checked >= 5


@needs_shared
def test_choices_interleave_and_are_validated() -> None:
    styler = load_styler(str(tokenizer_dirs()[0]))
    a, b = styler.tokenize("first choice 日本", False), styler.tokenize("second 👍🏽 choice", False)
    session = styler.open_stream(StreamOptions(num_choices=2, first_choice_index=3))
    out: dict[int, str] = {3: "", 4: ""}
    for i in range(max(len(a), len(b))):
        for index, ids in ((3, a), (4, b)):
            if i < len(ids):
                out[index] += session.add(index, ids[i : i + 1], finished=i == len(ids) - 1).text
    assert out == {3: "first choice 日本", 4: "second 👍🏽 choice"}
    assert session.all_done()
    with pytest.raises(ValueError, match="outside"):
        session.add(5, [1], finished=False)


@needs_shared
def test_stream_with_reasoning_and_tools_from_real_tokens() -> None:
    """Qwen3 output (real token ids), fed token by token: reasoning, content and a tool call."""
    styler = load_styler(str(shared_dir() / "tokenizers" / "qwen3"))
    assert (styler.tool_parser, styler.reasoning_parser) == ("hermes", "qwen3")
    output = (
        "<think>\nThe user wants weather. 天气\n</think>\n\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>'
    )
    ids = styler.tokenize(output, add_special_tokens=False)
    session = styler.open_stream(StreamOptions(tool_parser="auto", reasoning_parser="auto"))
    deltas = [session.add(0, [t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(d.reasoning_text for d in deltas) == "The user wants weather. 天气\n"
    assert "".join(d.text for d in deltas) == "Let me check.\n"
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "get_weather", '{"city": "Zürich"}')]
    assert calls[0].id.startswith("call_")


@needs_shared
@pytest.mark.parametrize(
    ("prompt_end", "opens"),
    [
        ("<think>\n", True),
        ("<think>\nLet me think", True),  # a continued thought (continue_final_message)
        ("<think>\n\n</think>\n\n", False),  # thinking turned off
        ("<think>\nA\n</think>\nB<|im_end|>\n<|im_start|>assistant\n", False),  # a closed earlier thought
    ],
)
def test_reasoning_opens_when_the_prompt_leaves_a_think_open(prompt_end: str, opens: bool) -> None:
    """The styler decides from the prompt ids themselves: no client flag, no exact suffix."""
    styler = load_styler(str(shared_dir() / "tokenizers" / "qwen3"))
    prompt = styler.tokenize("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + prompt_end, False)
    session = styler.open_stream(
        StreamOptions(prompt_token_ids=tuple(prompt), reasoning_parser="auto", prompt_opens_reasoning=False)
    )
    ids = (
        styler.tokenize(" about it.\n</think>\n\nHello.", False)
        if opens
        else styler.tokenize("Hello.", False)
    )
    deltas = [session.add(0, [t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    reasoning, content = "".join(d.reasoning_text for d in deltas), "".join(d.text for d in deltas)
    assert (reasoning, content) == ((" about it.\n", "Hello.") if opens else ("", "Hello."))


def test_prompt_opens_reasoning_on_text() -> None:
    from services.common.reasoning import prompt_opens_reasoning

    assert prompt_opens_reasoning("x<think>\nLet me think")
    assert prompt_opens_reasoning("<think>a</think> b <think>")
    assert not prompt_opens_reasoning("<think>a</think>")
    assert not prompt_opens_reasoning("no thought")


@needs_shared
def test_out_of_vocabulary_ids_name_their_field() -> None:
    styler = load_styler(str(shared_dir() / "tokenizers" / "qwen3"))
    size = styler.info().vocab_size
    with pytest.raises(ValueError, match=r"^start\.prompt_token_ids: token id"):
        styler.open_stream(StreamOptions(prompt_token_ids=(1, size)))
    # A generated id past the tokenizer (a padded embedding row) adds no text and fails nothing.
    session = styler.open_stream(StreamOptions())
    hello = styler.tokenizer.encode("Hello", add_special_tokens=False)
    assert session.add(0, [size + 5], finished=False).text == ""
    assert session.add(0, hello, finished=True).text == "Hello"
    with pytest.raises(ValueError, match=r"^start\.stop contains a lone UTF-16 surrogate"):
        styler.open_stream(StreamOptions(stop=("a\ud800b",)))


@needs_shared
def test_a_stop_string_inside_a_merged_delta_ends_at_its_own_token() -> None:
    """The worker merges steps when it falls behind: a stop string completed in the middle of a
    delta must count the same tokens (the gateway pairs logprobs with them) as one id at a time."""
    styler = load_styler(str(shared_dir() / "tokenizers" / "qwen3"))
    ids = styler.tokenizer.encode("Once upon a time. The end came soon after", add_special_tokens=False)
    one_by_one = styler.open_stream(StreamOptions(stop=(".",)))
    steps = [one_by_one.add(0, [t], finished=False) for t in ids]
    stopped_at = next(i for i, d in enumerate(steps) if d.stopped)
    merged = styler.open_stream(StreamOptions(stop=(".",))).add(0, ids, finished=True)
    assert merged.stopped and merged.matched_stop == "."
    assert merged.text == "".join(d.text for d in steps) == "Once upon a time"
    assert merged.num_tokens == steps[stopped_at].num_tokens == stopped_at + 1 < len(ids)


def _lead_byte_token(styler: Styler) -> int:
    """The token of the lone UTF-8 lead byte 0xE4: byte-level BPE spells it "ä", SentencePiece's
    byte fallback "<0xE4>". Repeated, it never completes a character."""
    for piece in ("ä", "<0xE4>"):
        token_id = styler.tokenizer.token_to_id(piece)
        if token_id is not None and styler.detokenize([token_id]) == "\ufffd":
            return token_id
    raise AssertionError("no token for the lone byte 0xE4")


def _held_text_dirs() -> list[Path]:
    stories = shared_dir() / "models" / "stories260K"
    dirs = [shared_dir() / "tokenizers" / "qwen3", stories]
    return [d for d in dirs if (d / "tokenizer.json").is_file()]


@needs_shared
@pytest.mark.parametrize("tok_dir", _held_text_dirs(), ids=lambda p: p.name)
@pytest.mark.parametrize("stop", [(), ("stop",)], ids=["plain", "stop-strings"])
def test_ids_whose_text_is_held_back_still_make_a_delta(tok_dir: Path, stop: tuple[str, ...]) -> None:
    """A model repeating a lone lead byte (greedy decoding of random weights does) gets no text
    until it finishes, but each batch of ids is a delta to send, with empty text and the ids it
    took: the gateway streams one chunk per token, as vLLM does. At the finish the text is the
    full decode, a U+FFFD per byte. With stop strings the ids go through one by one: the same."""
    styler = load_styler(str(tok_dir))
    byte = _lead_byte_token(styler)
    session = styler.open_stream(StreamOptions(stop=stop))
    batches = [[byte], [byte, byte], [byte, byte, byte], [byte]]
    deltas = [session.add(0, b, finished=i == len(batches) - 1) for i, b in enumerate(batches)]
    assert [(d.text, d.num_new_tokens, d.num_tokens, d.is_empty()) for d in deltas[:-1]] == [
        ("", 1, 1, False),
        ("", 2, 3, False),
        ("", 3, 6, False),
    ]
    assert deltas[-1].finished and (deltas[-1].num_new_tokens, deltas[-1].num_tokens) == (1, 7)
    full = styler.detokenize([byte] * 7)
    assert full == "\ufffd" * 7
    assert "".join(d.text for d in deltas) == full
    # A done choice ignores further ids: nothing to send for them.
    late = session.add(0, [byte], finished=False)
    assert late.is_empty() and late.num_new_tokens == 0
