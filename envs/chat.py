"""Chat plumbing for multi-turn episodes: tool-call parsing and token-exact incremental rendering.

**Tool calls** use the Hermes/Qwen format, which Qwen2.5/Qwen3 chat templates teach the model:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2 + 3 * 4"}}
    </tool_call>

``parse_tool_calls(text)`` returns the calls and the text around them; a block that is not a JSON
object with a string ``name`` (and a dict ``arguments``, or a JSON string of one) becomes a
parse error the env can answer, never an exception.

**Rendering.** A trajectory's tokens are built incrementally: the prompt is rendered once with
``apply_chat_template(messages, tools=..., add_generation_prompt=True)``; after each model turn
the *sampled* tokens stay exactly as sampled (never decoded and re-encoded), and only the tokens
of the new messages (tool results, user turns) are appended. Those are found as a suffix:
render ``base + new`` against ``base`` (``base`` is a fixed stand-in conversation ending with an
assistant turn, so the suffix cannot depend on how the template re-renders earlier turns, e.g.
Qwen3 dropping old reasoning) and check that the first is a string prefix of the second and that
the tokens split at the boundary. Before the suffix goes the end-of-turn text the template puts
after an assistant message (``<|im_end|>\\n`` in ChatML), minus what the model already sampled
(its stop token). A template for which the check fails raises ``TemplateError``.

``TOOL_CHAT_TEMPLATE`` is a ChatML template with Hermes tool rendering (as in Qwen2.5), for
tiny test models whose tokenizer has none.
"""

from __future__ import annotations

import json
import re
from typing import Any

from climbrl.envs.base import Message, ToolCall

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """(content without tool-call blocks, calls, errors). An unclosed last block still counts."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for i, m in enumerate(_TOOL_CALL.finditer(text)):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"tool call {i}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f"tool call {i}: expected an object with a string 'name'")
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                errors.append(f"tool call {i}: 'arguments' is a string but not JSON")
                continue
        if not isinstance(args, dict):
            errors.append(f"tool call {i}: 'arguments' must be an object")
            continue
        calls.append(ToolCall(name=obj["name"], arguments=args, id=f"call_{i}"))
    content = _TOOL_CALL.sub("", text).strip() if (calls or errors) else text
    return content, calls, errors


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """What a model writes to call a tool (for reference turns and prompts)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tc in message.get('tool_calls', []) %}"
    "{%- set f = tc['function'] if tc['function'] is defined else tc %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' "
    "+ (f['arguments'] if f['arguments'] is string else f['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot be rendered incrementally, token-exactly."""


_MARK = "\x1fclimbrl-turn-end\x1f"
_BASE: list[Message] = [
    {"role": "user", "content": "?"},
    {"role": "assistant", "content": _MARK},
]


class ChatRenderer:
    """Renders an episode's messages with ``tokenizer``'s chat template, appending only suffixes."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template, but the env speaks in chat messages: set "
                "tokenizer.chat_template (e.g. climbrl.envs.chat.TOOL_CHAT_TEMPLATE)"
            )
        self.tok = tokenizer
        self.tools = tools or None
        prev = self._render(_BASE, generation_prompt=False)
        if _MARK not in prev:
            raise TemplateError("the chat template drops assistant message content")
        # Text the template writes after an assistant message's content (ChatML: "<|im_end|>\n").
        self.turn_end = prev[prev.rindex(_MARK) + len(_MARK) :]
        self._specials = {i: tokenizer.convert_ids_to_tokens(i) for i in tokenizer.all_special_ids}

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        kw: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation_prompt}
        if self.tools:
            kw["tools"] = self.tools
        return self.tok.apply_chat_template(messages, **kw)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self._encode(self._render(messages, generation_prompt=True))

    def continuation_ids(self, sampled: list[int], new: list[Message]) -> list[int]:
        """Tokens to append after the model's ``sampled`` turn to add ``new`` messages and open
        the next assistant turn."""
        if not new:
            raise ValueError("no new messages to render")
        for m in new:
            if m.get("role") not in ("tool", "user", "system"):
                raise ValueError(f"an env may add tool, user or system messages, not {m!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message content must be a string, got {m!r}")
        prev = self._render(_BASE, generation_prompt=False)
        full = self._render(_BASE + list(new), generation_prompt=True)
        if not full.startswith(prev):
            raise TemplateError(
                "rendering new messages changes the text of earlier ones; this chat template "
                "cannot be extended incrementally"
            )
        suffix = full[len(prev) :]
        head = prev[: prev.rindex(_MARK) + len(_MARK)]
        if self._encode(full) != self._encode(head) + self._encode(self.turn_end + suffix):
            raise TemplateError(
                "the chat template's tokens do not split at the end of an assistant turn; "
                "appending new messages would not be token-exact"
            )
        closer = self.turn_end
        if sampled and sampled[-1] in self._specials:
            stop = self._specials[sampled[-1]]
            if closer.startswith(stop):  # the model sampled the end-of-turn token itself
                closer = closer[len(stop) :]
        return self._encode(closer + suffix)
