"""Bad data files: one line that names the recipe key, the file, the line (1-based) and the cause."""

from __future__ import annotations

import json

import pytest

from trl_plus.cli import main
from trl_plus.data.load import load_preferences
from trl_plus.errors import TrlPlusError
from trl_plus.testing import preference_rows

GOOD = [json.dumps(row) for row in preference_rows(5)]
BAD_LINE = '{"prompt": "p" "chosen": "a", "rejected": "b"}'  # the comma after "p" is missing: column 16


def bad_files(tmp_path):
    """(file, what the message says after the file's path) for each kind of bad file."""
    cases = {
        "empty.jsonl": (b"", "empty file"),
        "blank.jsonl": (b"  \n\n\t\n", "empty file"),
        "bad.jsonl": ("\n".join([*GOOD, BAD_LINE, GOOD[0]]).encode(),
                      "line 6: invalid JSON (Expecting ',' delimiter: column 16)"),
        "bad.json": (b'[{"prompt": "p",\n  "chosen": "a" "rejected": "b"}]',
                     "line 2: invalid JSON (Expecting ',' delimiter: column 17)"),
        "latin1.jsonl": ("\n".join([*GOOD[:2], '{"prompt": "café", "chosen": "a", "rejected": "b"}']).encode("latin-1"),
                         "line 3: not UTF-8 (byte 0xe9 at column 16: invalid continuation byte)"),
        "latin1.csv": ("prompt,chosen,rejected\np,a,b\ncafé,a,b\n".encode("latin-1"),
                       "line 3: not UTF-8 (byte 0xe9 at column 4: invalid continuation byte)"),
    }  # fmt: skip
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        yield tmp_path / name, problem


def test_load_preferences_names_the_file_the_line_and_the_cause(tmp_path):
    for path, problem in bad_files(tmp_path):
        with pytest.raises(TrlPlusError) as info:
            load_preferences(str(path), where="recipe.yaml: data.train")
        assert str(info.value) == f"recipe.yaml: data.train.path: {path}: {problem}"


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "b.jsonl").write_text(GOOD[0] + "\n" + BAD_LINE + "\n")
    with pytest.raises(TrlPlusError, match=r"^data.train.path: .*b\.jsonl: line 2: invalid JSON \(Expecting ','"):
        load_preferences(str(tmp_path))


def test_validate_prints_one_line_and_exits_2(tmp_path, capfd):
    for path, problem in bad_files(tmp_path):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"method: dpo\nmodel: {{name_or_path: tiny-llama}}\ndata: {{train: {{path: {path}}}}}\n")
        assert main(["validate", str(recipe)]) == 2
        _, err = capfd.readouterr()
        assert err.strip() == f"error: {recipe}: data.train.path: {path}: {problem}", err


def test_good_files_still_load(tmp_path):
    (tmp_path / "ok.jsonl").write_text("\n".join(GOOD) + "\n\n")
    (tmp_path / "ok.csv").write_text("prompt,chosen,rejected\ncafé,a,b\n")
    assert len(load_preferences(str(tmp_path / "ok.jsonl"))) == 5
    assert load_preferences(str(tmp_path / "ok.csv"))[0]["prompt"] == "café"


def test_text_columns_of_another_type_are_named_before_tokenizing(tmp_path, capsys):
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps({"prompt": i, "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: dpo\nmodel: {{name_or_path: tiny-llama}}\ndata: {{train: {{path: {data}}}}}\n")
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: data.train ({data}): column 'prompt' holds int64 values; method 'dpo' reads text there (a "
        "string, or a list of chat messages with role and content)"
    )
    from trl_plus.testing import tiny_trainer

    with pytest.raises(TrlPlusError, match="train dataset: column 'prompt' holds int64 values"):
        tiny_trainer("dpo", tmp_path / "out", rows=[{"prompt": 1, "chosen": "a", "rejected": "b"}] * 4)
    messages = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
                 "rejected": [{"role": "assistant", "content": "no"}]}] * 8  # fmt: skip
    tiny_trainer("dpo", tmp_path / "chat", rows=messages)  # chat messages are text too


def test_a_hub_datasets_configuration_reaches_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(preference_rows(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_preferences("HPAI-BSC/Egida", "train", name="Egida-DPO-Qwen2.5-7B-Instruct")
    assert calls == [("HPAI-BSC/Egida", "Egida-DPO-Qwen2.5-7B-Instruct", "train")] and len(dataset) == 3


def test_a_configuration_name_on_a_local_file_is_an_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(2)))
    with pytest.raises(TrlPlusError, match=r"data.train.name: 'Egida' is a hub dataset's configuration, but .* is local"):
        load_preferences(str(path), name="Egida")
