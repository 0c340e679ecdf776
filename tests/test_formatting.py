"""Formatting: response masking per format, truncation policy, skips and clear errors."""

import pytest
from datasets import Dataset

from hf_influence.testing import CHAT_ROWS
from hf_influence.formatting import FormattingConfig, FormattingError, detect_format, format_dataset, pad_batch
from hf_influence.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def response_text(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


def test_chat_rows_keep_only_assistant_turns(tokenizer):
    formatted = format_dataset(CHAT_ROWS, tokenizer, show_progress=False)
    assert formatted.format == "chat" and not formatted.skipped
    multi_turn = formatted.dataset[4]
    assert response_text(tokenizer, multi_turn) == "The Seine.<|im_end|>\nThe Thames flows through London.<|im_end|>\n"
    system_row = formatted.dataset[2]
    assert "careful" not in response_text(tokenizer, system_row)
    # The full sequence is exactly the chat template's rendering.
    rendered = tokenizer.apply_chat_template(CHAT_ROWS[4]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert multi_turn["input_ids"] == list(rendered)
    assert multi_turn["num_label_tokens"] == sum(label != -100 for label in multi_turn["labels"])


@pytest.mark.parametrize("columns,expected", [
    ({"prompt": ["What is 2+2?"], "completion": ["4"]}, "prompt_completion"),
    ({"prompt": ["What is 2+2?"], "answer": ["4"], "id": ["x"]}, "prompt_answer"),
])
def test_prompt_response_formats(tokenizer, columns, expected):
    formatted = format_dataset(Dataset.from_dict(columns), tokenizer, show_progress=False)
    assert formatted.format == expected
    assert response_text(tokenizer, formatted.dataset[0]) == "4<|im_end|>\n"


def test_gsm8k_rows_train_on_the_worked_solution_and_the_response_column_overrides(tokenizer):
    """GSM8K rows carry a worked `solution` and its bare final `answer`: the solution is the response by default
    (training on "4" teaches nothing of the reasoning); response_column picks another."""
    rows = Dataset.from_dict({"prompt": ["Add 2 and 2."], "answer": ["4"], "solution": ["2 + 2 = 4. #### 4"]})
    formatted = format_dataset(rows, tokenizer, show_progress=False)
    assert response_text(tokenizer, formatted.dataset[0]).startswith("2 + 2 = 4.")
    plain = format_dataset(rows, tiny_tokenizer(chat_template=None),
                           FormattingConfig(use_chat_template=False, response_column="answer"), show_progress=False)
    assert response_text(tokenizer, plain.dataset[0]) == "4<|im_end|>"


def test_text_rows_train_on_every_token_as_sft_trainer_does(tokenizer):
    """TRL's language-modelling rows (a `text` column): no template, every token a label, end of sequence added;
    an empty text is skipped like an empty response; the sentence encoder embeds the text itself."""
    from hf_influence.networks.encoders import row_text

    rows = [{"text": "The Seine flows through Paris."}, {"text": "  "}]
    formatted = format_dataset(rows, tokenizer, show_progress=False)
    assert formatted.format == "text" and formatted.skipped == {1: "no_label_tokens"}
    row = formatted.dataset[0]
    expected = tokenizer("The Seine flows through Paris.")["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == expected and row["labels"] == expected
    assert row["num_label_tokens"] == len(expected) - 1
    assert row_text(rows[0]) == "The Seine flows through Paris."
    with pytest.raises(FormattingError, match="Row 0: column 'text' must hold a string"):
        format_dataset([{"text": 3}], tokenizer, show_progress=False)


def test_empty_responses_are_skipped_and_reported(tokenizer, caplog):
    rows = CHAT_ROWS[:2] + [{"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "  "}]}]
    formatted = format_dataset(rows, tokenizer, show_progress=False)
    assert formatted.skipped == {2: "no_label_tokens"}
    assert formatted.dataset["row_id"] == [0, 1]
    assert "1 of 3 rows" in caplog.text and "2 (no_label_tokens)" in caplog.text
    with pytest.raises(FormattingError, match="2 \\(no_label_tokens\\)"):
        format_dataset(rows, tokenizer, FormattingConfig(on_skip="error"), show_progress=False)
    with pytest.raises(FormattingError, match="Every row was skipped"):
        format_dataset(rows[2:], tokenizer, show_progress=False)


def test_truncation_policies(tokenizer):
    long_prompt = {"prompt": "word " * 200, "completion": "short answer"}
    long_answer = {"prompt": "q", "completion": "word " * 200}
    config = FormattingConfig(max_length=48)
    formatted = format_dataset([long_prompt, long_answer], tokenizer, config, show_progress=False)
    kept_prompt, kept_answer = formatted.dataset[0], formatted.dataset[1]
    assert len(kept_prompt["input_ids"]) == 48 and len(kept_answer["input_ids"]) == 48
    # The prompt loses tokens from the left; the response is kept whole.
    assert response_text(tokenizer, kept_prompt) == "short answer<|im_end|>\n"
    # A response longer than the budget keeps its start.
    assert response_text(tokenizer, kept_answer).startswith("word word")
    dropped = format_dataset([long_prompt, {"prompt": "q", "completion": "a"}], tokenizer, FormattingConfig(max_length=48, truncation="drop"), show_progress=False)
    assert dropped.skipped == {0: "too_long"}
    with pytest.raises(FormattingError, match="Row 0 has .* tokens > max_length=48"):
        format_dataset([long_prompt], tokenizer, FormattingConfig(max_length=48, truncation="error"), show_progress=False)


def test_clear_errors(tokenizer):
    with pytest.raises(FormattingError, match="Cannot tell the row format from columns \\['body', 'id'\\]"):
        format_dataset(Dataset.from_dict({"id": [1], "body": ["x"]}), tokenizer)
    with pytest.raises(FormattingError, match="empty"):
        format_dataset([], tokenizer)
    with pytest.raises(FormattingError, match="has no chat template"):
        format_dataset(CHAT_ROWS, tiny_tokenizer(chat_template=None))
    with pytest.raises(FormattingError, match="Row 1, column .messages., message 0"):
        format_dataset([CHAT_ROWS[0], {"messages": [{"content": "no role"}]}], tokenizer, show_progress=False)
    with pytest.raises(FormattingError, match="Row 1 has no 'messages' field"):
        format_dataset([CHAT_ROWS[0], {"prompt": "q", "completion": "a"}], tokenizer, show_progress=False)
    with pytest.raises(FormattingError, match="response_column='solution' is not a column"):
        detect_format(["prompt", "answer"], FormattingConfig(response_column="solution"))
    with pytest.raises(ValueError, match="truncation"):
        FormattingConfig(truncation="middle")


def test_non_prefix_consistent_template_is_refused(tokenizer):
    reversed_template = "{% for message in messages | reverse %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    with pytest.raises(FormattingError, match="not prefix-consistent"):
        format_dataset(CHAT_ROWS[:1], tokenizer, FormattingConfig(chat_template=reversed_template), show_progress=False)


def test_pad_batch_masks_padding(tokenizer):
    formatted = format_dataset(CHAT_ROWS, tokenizer, show_progress=False).dataset
    batch = pad_batch(list(formatted), tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    for i, row in enumerate(formatted):
        n = len(row["input_ids"])
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == -100).all()


def test_progress_is_an_argument_of_the_pass_and_of_the_run(tokenizer, capsys):
    """format_dataset(show_progress=...) switches its bar; FormattingConfig(show_progress=...) still does, with a
    FutureWarning; in a run the flat option show_progress belongs to the run (SelectionConfig), not formatting."""
    import dataclasses

    from hf_influence.options import SelectionConfig, split_options

    format_dataset(CHAT_ROWS, tokenizer, show_progress=False)
    assert "Formatting" not in capsys.readouterr().err
    format_dataset(CHAT_ROWS, tokenizer, show_progress=True)
    assert "Formatting" in capsys.readouterr().err
    with pytest.warns(FutureWarning, match="pass show_progress to format_dataset"):
        legacy = FormattingConfig(max_length=64, show_progress=False)
    format_dataset(CHAT_ROWS, tokenizer, legacy)
    assert "Formatting" not in capsys.readouterr().err
    assert "show_progress" not in {f.name for f in dataclasses.fields(FormattingConfig)}
    assert split_options({"show_progress": False})[SelectionConfig].show_progress is False


def test_prompt_left_truncation_is_counted_by_what_it_cut(caplog):
    from hf_influence.testing import tiny_causal_lm

    _, tokenizer = tiny_causal_lm("llama", seed=0)
    rows = [{"prompt": "word " * n_prompt, "completion": "yes " * n_response}
            for n_prompt, n_response in ((2, 1), (60, 1), (200, 30), (200, 300))]
    lengths = [len(format_dataset([row], tokenizer, FormattingConfig(max_length=4096), show_progress=False)
                   .dataset[0]["input_ids"]) for row in rows]
    first_labels = [next(i for i, label in enumerate(formatted["labels"]) if label != -100) for formatted in
                    (format_dataset([row], tokenizer, FormattingConfig(max_length=4096), show_progress=False)
                     .dataset[0] for row in rows)]
    # A max_length that keeps row 0 whole, cuts into row 1's prompt, removes row 2's whole prompt exactly and
    # cuts row 3's response too.
    max_length = lengths[2] - first_labels[2]
    assert lengths[0] <= max_length < lengths[1] and lengths[1] - max_length < first_labels[1]
    assert lengths[3] - first_labels[3] > max_length
    formatted = format_dataset(rows, tokenizer, FormattingConfig(max_length=max_length), show_progress=False)
    assert formatted.truncated == {1: "part_of_prompt", 2: "whole_prompt", 3: "response"}
    message = next(record.getMessage() for record in caplog.records if "cut from the left" in record.getMessage())
    assert "3 of 4 rows" in message and "1 lost part of their prompt, 1 their whole prompt, 1 also response" in message


def test_alpaca_rows_format_as_their_prompt_and_response():
    from hf_influence.networks.encoders import prompt_and_response, row_text
    from hf_influence.testing import tiny_causal_lm

    _, tokenizer = tiny_causal_lm("llama", seed=0)
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    plain = [{"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"},
             {"prompt": "Name a colour.", "completion": "Blue."}]
    formatted = format_dataset(alpaca, tokenizer, show_progress=False)
    expected = format_dataset(plain, tokenizer, show_progress=False)
    assert formatted.format == "alpaca"
    assert formatted.dataset["input_ids"] == expected.dataset["input_ids"]
    assert formatted.dataset["labels"] == expected.dataset["labels"]
    assert prompt_and_response(alpaca[0]) == ([{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], "5")
    assert row_text(alpaca[1]) == "Name a colour.\n##Answer: Blue."
    with pytest.raises(FormattingError, match="empty 'output'"):
        prompt_and_response({"instruction": "x", "output": " "})


def test_trl_conversational_prompt_completion_rows_train_on_the_completion_turns_only(tokenizer):
    # TRL's conversational prompt/completion: the prompt's turns (an earlier assistant turn included) are context.
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    completion = [{"role": "assistant", "content": "Rome."}]
    rows = Dataset.from_list([{"prompt": prompt, "completion": completion}])
    formatted = format_dataset(rows, tokenizer, show_progress=False)
    as_chat = format_dataset([{"messages": prompt + completion}], tokenizer, show_progress=False).dataset[0]
    row = formatted.dataset[0]
    assert formatted.format == "prompt_completion"
    assert row["input_ids"] == as_chat["input_ids"]  # the same rendering as the chat row of the same turns
    assert response_text(tokenizer, row) == "Rome.<|im_end|>\n"  # where the chat row also trains on "Paris."
    assert response_text(tokenizer, as_chat) == "Paris.<|im_end|>\nRome.<|im_end|>\n"


@pytest.mark.parametrize(("row", "match"), [
    ({"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4"}, "must both be strings or both lists"),
    ({"prompt": [{"role": "user", "content": "2+2?"}], "completion": []}, "'completion' must be a non-empty list"),
    ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "4"}]},
     "column 'prompt', message 0: each message needs 'role' and 'content'"),
])
def test_malformed_conversational_rows_are_named(tokenizer, row, match):
    with pytest.raises(FormattingError, match=f"Row 0.*{match}"):
        format_dataset([row], tokenizer, show_progress=False)


def test_conversational_rows_without_a_chat_template_are_refused(tokenizer):
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    with pytest.raises(FormattingError, match="Row 0: conversational prompt/completion rows need a chat template"):
        format_dataset([row], tokenizer, FormattingConfig(use_chat_template=False), show_progress=False)
