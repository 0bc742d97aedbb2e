"""Tool-call parsing and token-exact incremental rendering of new chat messages."""

from __future__ import annotations

import pytest

from climbrl.envs.chat import (
    TOOL_CHAT_TEMPLATE,
    ChatRenderer,
    TemplateError,
    format_tool_call,
    parse_tool_calls,
)
from climbrl.envs.tool_use import TOOLS


@pytest.fixture(scope="module")
def tok():
    from climbrl.tokenizer import train_bpe_tokenizer

    t = train_bpe_tokenizer(
        ["compute the calculator result 12 + 7 tool_response"] * 20, vocab_size=300
    )
    t.chat_template = TOOL_CHAT_TEMPLATE
    return t


def test_parse_tool_calls():
    text = (
        "Let me see.\n"
        + format_tool_call("calculator", {"expression": "1+2"})
        + '\n<tool_call>\n{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}\n'
        "</tool_call>\n<tool_call>{oops</tool_call><tool_call>[1]</tool_call>"
        '<tool_call>{"name": "python", "arguments": {"code": "x"'
    )
    content, calls, errors = parse_tool_calls(text)
    assert content == "Let me see."
    assert [(c.name, c.arguments, c.id) for c in calls] == [
        ("calculator", {"expression": "1+2"}, "call_0"),
        ("python", {"code": "print(1)"}, "call_1"),
    ]
    assert len(errors) == 3 and "not JSON" in errors[0] and "'name'" in errors[1]
    assert parse_tool_calls("plain answer") == ("plain answer", [], [])


def _sampled(tok, text, end):
    ids = tok.encode(text, add_special_tokens=False)
    return ids + ([tok.convert_tokens_to_ids("<|im_end|>")] if end else [])


@pytest.mark.parametrize("ended", [True, False])
def test_continuation_is_the_template_suffix(tok, ended):
    """Incremental tokens == tokens of the fully rendered conversation, sampled ones untouched."""
    r = ChatRenderer(tok, TOOLS)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "12 + 7?"}]
    a1 = "I will compute.\n" + format_tool_call("calculator", {"expression": "12 + 7"})
    new1 = [
        {"role": "tool", "name": "calculator", "tool_call_id": "call_0", "content": "19"},
        {"role": "tool", "content": "ok"},
    ]
    a2 = "The answer is 19."
    new2 = [{"role": "user", "content": "Sure?"}]
    ids = r.prompt_ids(msgs)
    s1 = _sampled(tok, a1, ended)
    ids += s1
    ids += r.continuation_ids(s1, new1)
    s2 = _sampled(tok, a2, ended)
    ids += s2
    ids += r.continuation_ids(s2, new2)
    full = (
        msgs
        + [{"role": "assistant", "content": a1}]
        + new1
        + [{"role": "assistant", "content": a2}]
        + new2
    )
    want = tok.apply_chat_template(full, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False) == want
    assert ids == tok.encode(want, add_special_tokens=False)


def test_continuation_keeps_noncanonical_sampled_tokens(tok):
    """Sampled tokens that re-tokenise differently are kept exactly; only new ones are added."""
    r = ChatRenderer(tok, None)
    text = "compute"
    split = [tok.convert_tokens_to_ids(c) for c in text]  # one token per letter: non-canonical
    assert split != tok.encode(text, add_special_tokens=False)
    cont = r.continuation_ids(split, [{"role": "user", "content": "again"}])
    assert (
        tok.decode(cont, skip_special_tokens=False)
        == "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    )


def test_renderer_rejects_bad_templates_and_messages(tok):
    from transformers import PreTrainedTokenizerFast

    r = ChatRenderer(tok, None)
    with pytest.raises(ValueError, match="tool, user or system"):
        r.continuation_ids([], [{"role": "assistant", "content": "x"}])
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(TemplateError, match="no chat template"):
        ChatRenderer(bare)
    # a template that renders the conversation's length up front is not prefix-stable
    bare.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="changes the text"):
        ChatRenderer(bare).continuation_ids([], [{"role": "user", "content": "x"}])
