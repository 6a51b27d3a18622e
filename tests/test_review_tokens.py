"""Review finding (money): chat prompts the estimate did not see. A base64 PDF in a chat `file`
part and a `response_format` JSON schema are billed as input but were estimated at 0, so a user
near a limit could send many concurrent calls each reserving a few tokens and each billing
thousands: the overrun bound ("the prompt the proxy under-estimated") multiplied by concurrency.
Both are now estimated as the Responses surface already estimates them."""

from __future__ import annotations

from proxy import tokens as tokens_mod


def test_a_chat_file_part_is_reserved_as_a_responses_input_file(tokens):
    data = "A" * 400_000                                    # 300,000 decoded bytes
    with_file = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarize."},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64," + data}}]}]}
    without = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Summarize."}]}]}
    extra = tokens.chat_prompt(with_file, "gpt-4o") - tokens.chat_prompt(without, "gpt-4o")
    assert extra >= 300_000 // tokens_mod.FILE_BYTES_PER_TOKEN


def test_a_chat_json_schema_response_format_is_counted(tokens):
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x " * 20}
                                               for i in range(50)}}
    base = {"messages": [{"role": "user", "content": "hi"}]}
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    extra = tokens.chat_prompt({**base, "response_format": fmt}, "gpt-4o") - tokens.chat_prompt(base, "gpt-4o")
    assert extra >= tokens.count(str(schema), "gpt-4o") // 2 > 500
