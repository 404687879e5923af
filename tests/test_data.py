"""Data files -> examples -> batches, on the character tokenizer (no download)."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from composer import batches, data
from composer.chartok import DEFAULT_ALPHABET, build_char_tokenizer
from composer.config import ConfigError
from composer.data import IGNORE_INDEX, Example
from composer.training_config import DataConfig

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, of course"},
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_text(tokenizer, example: Example) -> str:
    ids = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    return tokenizer.decode(ids)


# --- chartok ----------------------------------------------------------------------------------


def test_chartok_round_trips_every_character_without_inserting_spaces(tok):
    text = DEFAULT_ALPHABET + "  two  spaces\nnew line . , ! end"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, no bos/eos added
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(DEFAULT_ALPHABET)


def test_chartok_unknown_characters_and_custom_alphabet():
    tok = build_char_tokenizer("0123456789+=;", chat_template=False)
    assert tok.chat_template is None
    assert len(tok) == 4 + 13
    assert tok.decode(tok.encode("12+30=42;")) == "12+30=42;"
    assert tok.encode("1x") == [tok.convert_tokens_to_ids("1"), tok.unk_token_id]
    with pytest.raises(ConfigError, match="alphabet"):
        build_char_tokenizer("")


def test_chartok_survives_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello,  world!\n(a.b) = {c}"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.pad_token_id == 0 and loaded.eos_token == "<eos>"
    assert loaded.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(
        CHAT, tokenize=False
    )


def test_chartok_chat_template(tok):
    rendered = tok.apply_chat_template(CHAT[1:3], tokenize=False)
    assert rendered == "<bos><|user|>\n2+2?<eos><|assistant|>\n4<eos>"
    prompt = tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|>\n2+2?<eos><|assistant|>\n"
    ids = tok.apply_chat_template(CHAT[1:3], tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 2


# --- reading files ----------------------------------------------------------------------------


def test_read_rows_each_file_type(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert data.read_rows(write_jsonl(tmp_path / "x.jsonl", rows)) == rows

    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    assert data.read_rows(tmp_path / "list.json") == rows
    assert data.read_rows(tmp_path / "wrapped.json") == rows

    (tmp_path / "x.csv").write_text(
        'prompt,completion\na,b\n"c, quoted","multi\nline"\n', encoding="utf-8"
    )
    assert data.read_rows(tmp_path / "x.csv") == [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c, quoted", "completion": "multi\nline"},
    ]

    chat = {"messages": CHAT[1:3]}
    pq.write_table(pa.Table.from_pylist([chat, chat]), tmp_path / "x.parquet")
    assert data.read_rows(tmp_path / "x.parquet") == [chat, chat]

    (tmp_path / "x.txt").write_text("first\nblock\n\n\n  \nsecond block\n\n", encoding="utf-8")
    assert data.read_rows(tmp_path / "x.txt") == [
        {"text": "first\nblock"},
        {"text": "second block"},
    ]

    with gzip.open(tmp_path / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n\n")
    assert data.read_rows(tmp_path / "x.jsonl.gz") == rows[:1]


def test_read_rows_decodes_messages_in_csv(tmp_path):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(CHAT[1:3])]])
    assert data.read_rows(path) == [{"messages": CHAT[1:3]}]


def test_read_rows_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        data.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(ConfigError, match=r"x\.xlsx.*unknown extension.*\.jsonl"):
        data.read_rows(tmp_path / "x.xlsx")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line 3: not valid JSON"):
        data.read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ConfigError, match=r"lines\.json.*rename it to \.jsonl"):
        data.read_rows(tmp_path / "lines.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(ConfigError, match=r"obj\.json holds an object with keys \['rows'\]"):
        data.read_rows(tmp_path / "obj.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"broken\.parquet as Parquet"):
        data.read_rows(tmp_path / "broken.parquet")


# --- formats and validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"text": "abc", "id": 3}, "text"),
        ({"prompt": "a", "completion": "b", "source": "x"}, "prompt_completion"),
        ({"messages": CHAT}, "messages"),
    ],
)
def test_detect_format(row, fmt):
    # a first row that fits no shape is skipped; validation reports it later
    assert data.detect_format([{"oops": 1}, row, row]) == fmt


def test_detect_format_errors_list_keys_and_shapes():
    with pytest.raises(ConfigError, match=r"keys 'question', 'answer'.*prompt_completion") as e:
        data.detect_format([{"question": "q", "answer": "a"}], source="qa.jsonl")
    assert str(e.value).startswith("qa.jsonl: ")
    with pytest.raises(ConfigError, match=r"more than one format \(text, prompt_completion\)"):
        data.detect_format([{"text": "t", "prompt": "p", "completion": "c"}])
    with pytest.raises(ConfigError, match=r"mix formats: text \(row 1\), messages \(row 2\)"):
        data.detect_format([{"text": "t"}, {"messages": CHAT}])


def test_validate_rows_reports_file_row_and_reason():
    rows = [
        {"messages": CHAT},
        {"messages": [{"role": "bot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        {"messages": "hello"},
        {"text": "wrong shape"},
        {"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant"}]},
    ]
    problems = data.validate_rows(rows, "messages", source="chat.jsonl")
    assert [(p.source, p.row) for p in problems] == [("chat.jsonl", r) for r in (2, 3, 4, 5, 6, 7)]
    messages = [p.message for p in problems]
    assert "role 'bot'" in messages[0] and "system, user, assistant" in messages[0]
    assert "no assistant message" in messages[1]
    assert "message 2 (assistant) has empty content" in messages[2]
    assert "expected a non-empty list" in messages[3]
    assert "missing 'messages'" in messages[4]
    assert "message 1 (user) has content list" in messages[5]
    assert str(problems[0]).startswith("chat.jsonl, row 2: ")


def test_validate_rows_text_and_prompt_completion():
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "", "completion": "c"}]
    rows += [{"prompt": "p", "completion": 5}, {"prompt": "p"}]
    problems = data.validate_rows(rows, "prompt_completion", source="pc.csv")
    assert [p.row for p in problems] == [2, 3, 4]
    assert "'prompt' is empty" in problems[0].message
    assert "'completion' is int 5, expected a string" in problems[1].message
    assert "missing 'completion'" in problems[2].message
    assert data.validate_rows([{"text": None}], "text", source="t")[0].message.startswith(
        "'text' is NoneType"
    )


# --- encoding and label masking ---------------------------------------------------------------


def test_prompt_completion_loss_is_exactly_the_completion_and_eos(tok):
    ex = data.encode({"prompt": "3+4=", "completion": "7"}, "prompt_completion", tok, max_length=64)
    assert tok.decode(ex.input_ids) == "<bos>3+4=7<eos>"
    assert loss_text(tok, ex) == "7<eos>"
    assert ex.labels[:5] == [IGNORE_INDEX] * 5


def test_text_loss_on_every_token_after_bos(tok):
    ex = data.encode({"text": "a=1;b=2"}, "text", tok, max_length=64)
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert loss_text(tok, ex) == "a=1;b=2<eos>"


def test_messages_loss_only_on_assistant_turns(tok):
    ex = data.encode({"messages": CHAT}, "messages", tok, max_length=512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert ex.input_ids.count(tok.bos_token_id) == 1  # the template's bos is not doubled
    assert loss_text(tok, ex) == "4<eos>6, of course<eos>"


def test_messages_span_drops_whitespace_after_end_of_turn():
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ex = data.encode({"messages": CHAT[1:3]}, "messages", tok, max_length=128)
    assert tok.decode(ex.input_ids) == "<bos>user: 2+2?<eos>\nassistant: 4<eos>\n"
    assert loss_text(tok, ex) == "4<eos>"


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    tok = build_char_tokenizer()
    # the number of turns in a header changes every rendering, so no rendering extends another
    tok.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="message 3 .assistant. as an extension"):
        data.encode({"messages": CHAT[:3]}, "messages", tok, max_length=128)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[:3]}])
    with pytest.raises(ConfigError, match=r"chat\.jsonl, row 1: the chat template does not"):
        data.load_dataset(path, tok, max_length=128)


def test_messages_need_a_chat_template(tmp_path):
    tok = build_char_tokenizer(chat_template=False)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match="no chat template.*prompt_completion"):
        data.load_dataset(path, tok, max_length=128)


def test_truncation_keeps_the_start(tok):
    ex = data.encode({"text": "abcdefghij"}, "text", tok, max_length=4)
    assert tok.decode(ex.input_ids) == "<bos>abc"
    assert len(ex.labels) == 4
    ex = data.encode({"prompt": "ab", "completion": "cdef"}, "prompt_completion", tok, max_length=4)
    assert loss_text(tok, ex) == "c"
    with pytest.raises(ConfigError, match="no token carries loss after truncation.*max_length=4"):
        data.encode({"prompt": "abcdef", "completion": "g"}, "prompt_completion", tok, max_length=4)


# --- datasets ---------------------------------------------------------------------------------


def test_load_dataset_skips_and_reports_bad_rows(tok, tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]
    rows[2] = {"prompt": "x", "completion": ""}
    rows[4] = {"prompt": "a very long prompt indeed", "completion": "!"}  # truncated away
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    split = data.load_dataset(path, tok, max_length=10)
    assert split.format == "prompt_completion"
    assert len(split.train) == 4 and split.eval == []
    assert [(p.source, p.row) for p in split.problems] == [(str(path), 3), (str(path), 5)]
    assert "'completion' is empty" in split.problems[0].message
    assert "after truncation" in split.problems[1].message
    assert [loss_text(tok, ex) for ex in split.train] == ["1<eos>", "2<eos>", "4<eos>", "6<eos>"]


def test_empty_and_all_invalid_files_are_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"empty\.jsonl has no examples"):
        data.load_dataset(tmp_path / "empty.jsonl", tok, max_length=32)
    rows = [{"text": ""}, {"text": 3}, {"text": "  "}, {"text": None}, {"text": []}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        data.load_dataset(path, tok, max_length=32)
    message = str(e.value)
    assert "all 5 rows were rejected" in message
    assert f"{path}, row 1: 'text' is empty" in message
    assert f"{path}, row 2: 'text' is int 3" in message
    assert "(and 2 more)" in message


def test_split_is_deterministic_and_disjoint(tok, tmp_path):
    rows = [{"text": f"row {i:02d}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)

    def split_texts(seed):
        split = data.load_dataset(path, tok, max_length=32, eval_fraction=0.25, seed=seed)
        decode = [tok.decode(ex.input_ids, skip_special_tokens=True) for ex in split.eval]
        return decode, len(split.train)

    eval_a, n_train = split_texts(0)
    assert len(eval_a) == 10 and n_train == 30
    assert split_texts(0) == (eval_a, 30)
    assert split_texts(1)[0] != eval_a
    assert eval_a == sorted(eval_a)  # file order kept


def test_columns_map_a_datasets_own_names(tok, tmp_path):
    """A parquet file shaped like GSM8K's (question/answer) trains as prompt/completion."""
    rows = [
        {"question": "1+1?", "answer": "2", "id": 1},
        {"question": "2+2?", "answer": "4", "id": 2},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    with pytest.raises(ConfigError, match="Could not tell the format|expected rows shaped|keys"):
        data.load_dataset(tmp_path / "gsm.parquet", tok, max_length=32)
    columns = {"question": "prompt", "answer": "completion"}
    split = data.load_dataset(tmp_path / "gsm.parquet", tok, max_length=32, columns=columns)
    assert split.format == "prompt_completion"
    assert [loss_text(tok, ex) for ex in split.train] == ["2<eos>", "4<eos>"]
    shown = data.preview(tmp_path / "gsm.parquet", tok, max_length=32, columns=columns)
    assert [(p["format"], p["loss_text"], p["problem"]) for p in shown] == [
        ("prompt_completion", "2<eos>", None),
        ("prompt_completion", "4<eos>", None),
    ]
    config = DataConfig.from_mapping({"train": "gsm.parquet", "columns": columns})
    assert config.columns == columns
    with pytest.raises(ConfigError, match=r"data.columns is .*one of text, prompt, completion"):
        DataConfig.from_mapping({"train": "x.jsonl", "columns": {"question": "query"}})


def test_eval_path_and_bad_split_settings(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "aa"}, {"text": "bb"}])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "c", "completion": "d"}])
    split = data.load_dataset(train, tok, max_length=16, eval_path=held)
    assert len(split.train) == 2 and [loss_text(tok, ex) for ex in split.eval] == ["d<eos>"]
    with pytest.raises(ConfigError, match="both eval_path"):
        data.load_dataset(train, tok, max_length=16, eval_path=held, eval_fraction=0.5)
    with pytest.raises(ConfigError, match="eval_fraction is 1.0"):
        data.load_dataset(train, tok, max_length=16, eval_fraction=1.0)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "aa"}])
    with pytest.raises(ConfigError, match="too few to hold out"):
        data.load_dataset(one, tok, max_length=16, eval_fraction=0.1)


def test_preview(tok, tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}]
    rows += [{"messages": CHAT[1:3]}] * 5
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    shown = data.preview(path, tok, max_length=60, n=3)
    assert [s["row"] for s in shown] == [1, 2, 3]
    first, second, third = shown
    assert first["format"] == "messages"
    assert first["truncated"] and first["num_tokens"] == 60
    full_ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert first["text"] == tok.decode(full_ids[:60])
    assert first["loss_text"] == "4<eos>" and first["problem"] is None
    assert second["problem"] is not None and "no assistant message" in second["problem"]
    assert second["num_tokens"] == 0
    assert third["problem"] is None and not third["truncated"]
    assert third["loss_text"] == "4<eos>" and third["loss_spans"] == ["4<eos>"]
    assert third["num_loss_tokens"] == 2
    assert third["num_tokens"] == len(
        tok.apply_chat_template(CHAT[1:3], tokenize=True, return_dict=False)
    )


def test_preview_reports_rows_with_no_loss_after_truncation(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    (shown,) = data.preview(path, tok, max_length=8)
    assert "no token carries loss after truncation" in shown["problem"]
    assert shown["truncated"] and shown["text"] == "<bos><|syste"
    assert shown["num_loss_tokens"] == 0 and shown["loss_spans"] == []


# --- batches ----------------------------------------------------------------------------------


def test_collate_right_and_left_padding():
    examples = [Example([1, 5, 6], [-100, 5, 6]), Example([1, 7], [-100, 7])]
    right = batches.collate(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    left = batches.collate(examples, pad_token_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6], [9, 1, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert left["labels"].tolist() == [[-100, 5, 6], [-100, -100, 7]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ConfigError, match="padding_side"):
        batches.collate(examples, pad_token_id=0, padding_side="middle")


def test_length_grouped_batches():
    lengths = [(7 * i) % 23 + 1 for i in range(230)]
    examples = [Example([1] * n, [-100] * n) for n in lengths]
    grouped = batches.length_grouped_batches(examples, batch_size=4, seed=0)
    assert sorted(i for b in grouped for i in b) == list(range(230))
    assert sorted(len(b) for b in grouped) == [2] + [4] * 57  # 200 + 30: one short batch
    assert batches.length_grouped_batches(examples, batch_size=4, seed=0) == grouped
    assert batches.length_grouped_batches(examples, batch_size=4, seed=1) != grouped
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # an OOM shows at the first step
    # within a mega-batch (200 here) batches are cut from a sorted list: little padding
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert spread <= 2 * len(grouped)
    fixed = batches.length_grouped_batches(examples, batch_size=4, seed=0, shuffle=False)
    assert fixed[0] == sorted(range(200), key=lambda i: -lengths[i])[:4]
    assert [len(b) for b in fixed][-8:] == [4] * 7 + [2]
