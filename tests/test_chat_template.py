"""Chat-template rendering, compared with transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from tokenizer_fixtures import write_bpe_tokenizer, write_sentencepiece_tokenizer
from transformers import AutoTokenizer

from inferflux.chat_template import ChatTemplateError, compile_chat_template, render_chat
from inferflux.tokenizer import Tokenizer

# Qwen-style ChatML with a tools block, <think> switch, namespace and loop controls.
CHATML = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are helpful.{% endif %}


# Tools
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools><|im_end|>
{% elif messages[0].role != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
{% for message in messages %}
  {% if message.role == 'system' and tools %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.content is defined %}{{ message.content }}{% endif %}
{% if message.tool_calls is defined %}
  {% for call in message.tool_calls %}
<tool_call>
{{ call.function | tojson }}
</tool_call>
  {% endfor %}
{% endif %}
<|im_end|>
{% if loop.index0 == ns.last_user and stop_after_last_user is defined %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{% endif %}"""

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set rest = messages %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

Year: {{ strftime_now('%Y') }}
{% if system %}{{ system }}{% endif %}<|eot_id|>
{%- for m in rest %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

INST = """{%- if messages[0]['role'] == 'system' %}
    {%- set sys = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set sys = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and sys %}
            {%- set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + message['content'] %}
        {%- else %}
            {%- set content = message['content'] %}
        {%- endif %}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo du jour — 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City <name> & 'quote'"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Ça va? 你好 😀"},
        {"role": "assistant", "content": " Oui! "},
        {"role": "user", "content": "And <b>now</b> & then?"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
    ],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {
        "chatml": write_bpe_tokenizer(root / "chatml", chat_template=CHATML),
        "llama3": write_bpe_tokenizer(root / "llama3", chat_template=LLAMA3),
        "inst": write_sentencepiece_tokenizer(root / "inst", 512, chat_template=INST),
    }


def _both(folder: Path, messages: list[dict[str, Any]], **kw: Any) -> tuple[str, str]:
    ours = Tokenizer.from_pretrained(folder).apply_chat_template(messages, **kw)
    ref = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, **kw
    )
    return ours, ref


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_matches_transformers(folders: dict[str, Path], conv: int, gen: bool) -> None:
    messages = CONVERSATIONS[conv]
    for kw in ({}, {"tools": TOOLS}, {"enable_thinking": False}, {"stop_after_last_user": 1}):
        ours, ref = _both(folders["chatml"], messages, add_generation_prompt=gen, **kw)
        assert ours == ref, kw
    ours, _ = _both(folders["chatml"], messages, tools=TOOLS)
    assert '"Météo du jour — 天气"' in ours and "<name> & 'quote'" in ours  # tojson keeps text


def test_chatml_tokens_match_transformers(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(folders["chatml"])
    ref = AutoTokenizer.from_pretrained(str(folders["chatml"]))
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tools=TOOLS)
        ids = ref.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert tok.encode(text, add_special_tokens=False) == list(ids)
        assert tok.encode(text, add_special_tokens=False).count(tok.token_to_id("<|im_start|>"))


@pytest.mark.parametrize("gen", [True, False])
def test_llama3_matches_transformers(folders: dict[str, Path], gen: bool) -> None:
    for messages in CONVERSATIONS[:2]:
        ours, ref = _both(folders["llama3"], messages, add_generation_prompt=gen)
        assert ours == ref
        assert ours.startswith("<s><|start_header_id|>system")


def test_inst_matches_transformers_and_raises(folders: dict[str, Path]) -> None:
    for messages in CONVERSATIONS[:2]:
        ours, ref = _both(folders["inst"], messages, add_generation_prompt=False)
        assert ours == ref
        assert ours.startswith("<s>[INST] ")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(str(folders["inst"])).apply_chat_template(bad, tokenize=False)
    tok = Tokenizer.from_pretrained(folders["inst"])
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match="Only user and assistant"):  # ChatTemplateError is one
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]
        )


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
        "{% set d = dict(a=1) %}{{ d.__class__ }}",
        "{{ messages.append(1) }}",
        "{{ (messages[0]).update({'role': 'x'}) }}",
    ],
)
def test_sandbox_escape_fails(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_render_chat_environment() -> None:
    msgs = [{"role": "user", "content": "é 😀"}, {"role": "assistant", "content": None}]
    assert render_chat("{{ messages[0] | tojson }}", msgs) == '{"role": "user", "content": "é 😀"}'
    assert render_chat("{{ {'a': [1]} | tojson(indent=2) }}", msgs) == '{\n  "a": [\n    1\n  ]\n}'
    # None-valued keys are dropped, as transformers does.
    assert render_chat("{{ messages[1].content is defined }}", msgs) == "False"
    loop = "{% for i in range(9) %}{% if i == 1 %}{% continue %}{% endif %}"
    loop += "{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_chat(loop, msgs) == "023"
    assert render_chat("{{ add_generation_prompt }}|{{ bos_token }}", msgs, bos_token="<s>") == (
        "True|<s>"
    )
    assert render_chat("  {% if true %}\n x{% endif %}", msgs) == " x"  # trim/lstrip blocks
    assert render_chat("{{ flag }}{{ documents }}", msgs, flag=3) == "3None"
    assert render_chat("{{ obj }}", msgs, obj=object()) == "<object>"
    assert len(render_chat("{{ strftime_now('%Y-%m-%d') }}", msgs)) == 10
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% for %}", msgs)
    with pytest.raises(ChatTemplateError, match="custom message"):
        render_chat("{{ raise_exception('custom message') }}", msgs)
    with pytest.raises(ChatTemplateError, match="undefined"):
        render_chat("{{ nothing.here }}", msgs)


def test_templates_compiled_once() -> None:
    template = "{{ messages | length }} unique-template-for-cache-test"
    before = compile_chat_template.cache_info()
    first = compile_chat_template(template)
    for _ in range(3):
        render_chat(template, [{"role": "user", "content": "x"}])
    assert compile_chat_template(template) is first
    after = compile_chat_template.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits >= 4
