"""The bad-input table: each row through the ``trl-plus`` command, one line that names the file, the field or the line
and the fix, exit code 2, no traceback (``--debug`` shows it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trl_plus import DPO, Paper, hookimpl
from trl_plus import registry as registry_module
from trl_plus.testing import cli, preference_rows, save_tiny_model, write_jsonl

GOOD = preference_rows(8)


def recipe_file(folder: Path, data: str = "pairs.jsonl", model: str = "tiny-llama", extra: str = "") -> str:
    path = folder / "recipe.yaml"
    path.write_text(f"method: dpo\nmodel: {{name_or_path: {model}}}\ndata: {{train: {{path: {data}}}}}\n{extra}")
    return str(path)


def rows_with(**changes) -> list[dict]:
    """The good rows with ``{row index: {field: value}}`` changes."""
    rows = [dict(r) for r in GOOD]
    for index, fields in changes.items():
        rows[int(index[1:])].update(fields)
    return rows


def write(folder: Path, name: str, content: bytes | str | list) -> None:
    if isinstance(content, list):
        write_jsonl(content, folder / name)
    else:
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


MESSAGES = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in GOOD]  # fmt: skip


def no_chat_template_model(folder: Path) -> str:
    model = Path(save_tiny_model(folder / "plain-model"))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return str(model)


def truncated_gguf(folder: Path) -> str:
    import gguf
    import numpy as np

    path = folder / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut in the middle
    return str(path)


# (row id, setup(folder) -> (recipe path, extra argv), the expected line: a regex of the whole line after "error: ")
def case_yaml(folder):
    path = folder / "recipe.yaml"
    path.write_text("method: dpo\nmodel: {name_or_path: tiny-llama\ndata: {train: {path: pairs.jsonl}}\n")
    return str(path), []


def case_data(content, **recipe):
    def setup(folder):
        write(folder, "pairs.jsonl", content)
        return recipe_file(folder, **recipe), []

    return setup


def case_chat_without_template(folder):
    write(folder, "pairs.jsonl", MESSAGES)
    return recipe_file(folder, model=no_chat_template_model(folder)), []


def case_model_without_config(folder):
    write(folder, "pairs.jsonl", GOOD)
    (folder / "my-model").mkdir()
    (folder / "my-model" / "tokenizer.json").write_text("{}")
    return recipe_file(folder, model="my-model"), []


def case_truncated_gguf(folder):
    write(folder, "pairs.jsonl", GOOD)
    truncated_gguf(folder)
    return recipe_file(folder, model=str(folder), extra=""), ["--set", "model.gguf_file=model.gguf"]


def case_set(*overrides):
    def setup(folder):
        write(folder, "pairs.jsonl", GOOD)
        return recipe_file(folder), ["--set", *overrides]

    return setup


BAD_LATIN1 = "\n".join(json.dumps(r) for r in GOOD[:2]) + "\n" + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'
ROWS = [
    ("malformed YAML", case_yaml,
     r"{recipe}: line 3, column 5: not valid YAML: expected ',' or '}}', but got ':' \(while parsing a flow mapping "
     r"that starts at line 2, column 8\); check the indentation, brackets and quotes there .*"),
    ("empty data file", case_data(b""), r"{recipe}: data.train.path: {folder}/pairs.jsonl: empty file"),
    ("malformed JSON line", case_data("\n".join(json.dumps(r) for r in GOOD[:3]) + '\n{"prompt": "p" "chosen": 1}\n'),
     r"{recipe}: data.train.path: {folder}/pairs.jsonl: line 4: invalid JSON \(Expecting ',' delimiter: column 16\)"),
    ("null chosen", case_data(rows_with(r2={"chosen": None})),
     r"{recipe}: data.train.path: row 3 \(line 3 of {folder}/pairs.jsonl\): 'chosen' is empty or null; every row needs "
     r"a chosen \(fill it in or remove the row\)"),
    ("empty chosen", case_data(rows_with(r4={"chosen": "  "}, r6={"chosen": ""})),
     r"{recipe}: data.train.path: row 5 \(line 5 of {folder}/pairs.jsonl\) and 1 more row: 'chosen' is empty or null; "
     r"every row needs a chosen \(fill it in or remove the row\)"),
    ("non-UTF-8 bytes", case_data(BAD_LATIN1.encode("latin-1")),
     r"{recipe}: data.train.path: {folder}/pairs.jsonl: line 3: not UTF-8 \(byte 0xe9 at column 16: invalid "
     r"continuation byte\)"),
    ("chat messages without a chat template", case_chat_without_template,
     r"{recipe}: data.train.path: column 'prompt' holds chat messages, but the tokenizer of {folder}/plain-model has "
     r"no chat template; use plain-text columns, or a model whose tokenizer has one .*"),
    ("model directory without config.json", case_model_without_config,
     r"{recipe}: model.name_or_path: {folder}/my-model has no config.json, so it is not a transformers model folder: "
     r"give the folder save_pretrained wrote \(or set model.gguf_file for a GGUF file in it\)"),
    ("truncated GGUF file", case_truncated_gguf,
     r"--set model.gguf_file: {folder}/model.gguf is not a complete GGUF file \(4176 bytes; ValueError: .*\): download "
     r"it again"),
    ("negative max_steps", case_set("training.max_steps=-5"),
     r"--set training.max_steps: -5 is not a step count; give a positive number, or -1 to train for num_train_epochs"),
    ("learning_rate 0", case_set("training.learning_rate=0"),
     r"--set training.learning_rate: must be positive, got 0.0"),
    ("beta 0", case_set("method_args.beta=0"),
     r"--set method_args.beta: Input should be greater than 0 \(got 0\)"),
    ("beta < 0", case_set("method_args.beta=-0.1"),
     r"--set method_args.beta: Input should be greater than 0 \(got -0.1\)"),
]  # fmt: skip


@pytest.mark.parametrize("setup, expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_each_bad_input_is_one_line_with_exit_code_2(tmp_path, capfd, setup, expected):
    import re

    folder = tmp_path.resolve()
    recipe, extra = setup(folder)
    assert cli("validate", recipe, *extra) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    pattern = expected.format(recipe=re.escape(recipe), folder=re.escape(str(folder)))
    assert re.fullmatch(pattern, lines[0][len("error: "):]), lines[0]


def test_the_same_errors_stop_train_before_any_step(tmp_path, capfd):
    folder = tmp_path.resolve()
    recipe, extra = case_chat_without_template(folder)
    assert cli("train", recipe, *extra, "--set", f"training.output_dir={folder / 'out'}") == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "holds chat messages, but the tokenizer" in err.strip().splitlines()[-1]


def test_pairs_whose_chosen_equals_rejected_are_left_out_with_a_warning(tmp_path, capfd, caplog):
    from trl_plus.config import load_recipe
    from trl_plus.registry import get_method
    from trl_plus.run.validate import load_split

    folder = tmp_path.resolve()
    rows = rows_with(r1={"rejected": GOOD[1]["chosen"]}, r5={"rejected": GOOD[5]["chosen"]})
    write(folder, "pairs.jsonl", rows)
    recipe = recipe_file(folder)
    with caplog.at_level("WARNING", logger="trl_plus"):
        assert cli("validate", recipe) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "trl_plus"] == [
        f"warning: {recipe}: data.train.path: 2 of 8 rows have chosen == rejected (row 2 (line 2 of "
        f"{folder}/pairs.jsonl) and 1 more row): left out, they carry no preference"
    ]
    dataset = load_split(load_recipe(recipe), get_method("dpo")(), "train")
    assert len(dataset) == 6 and all(r["chosen"] != r["rejected"] for r in dataset)


# -- plugins --------------------------------------------------------------------------------------------------


class FakeEntryPoint:
    def __init__(self, name, plugin):
        self.name, self._plugin = name, plugin
        self.dist = type("Dist", (), {"name": f"trl-plus-{name}"})()

    def load(self):
        return self._plugin


def method_named(name):
    return type(name.title().replace("-", ""), (DPO,), {"name": name, "paper": Paper("T", "0000.00000")})


class Exploding:
    @hookimpl
    def register_methods(self, register):
        register(method_named("half-registered"))
        raise RuntimeError("the plugin's GPU kernel is missing")


class Registers:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def register_methods(self, register):
        for name in self.names:
            register(method_named(name))


@pytest.fixture
def plugins(monkeypatch):
    """Install fake entry points for the rest of the test (the registry is rebuilt, and restored after)."""

    def install(*eps):
        monkeypatch.setattr(registry_module, "_selected_entry_points", lambda: list(eps))
        monkeypatch.setattr(registry_module, "_REGISTRY", None)

    yield install
    monkeypatch.undo()
    registry_module.get_registry(reload=True)


def test_a_plugin_whose_register_methods_raises_is_listed_broken_and_the_others_work(plugins, tmp_path, capsys):
    plugins(FakeEntryPoint("exploding", Exploding()), FakeEntryPoint("fine", Registers("fine-method")))
    assert cli("list") == 0
    out = capsys.readouterr().out
    assert "fine-method" in out and "dpo" in out and "half-registered" not in out.split("broken plugins")[0]
    assert "exploding: trl-plus-exploding (exploding): RuntimeError: the plugin's GPU kernel is missing" in out
    write(tmp_path, "pairs.jsonl", GOOD)
    assert cli("validate", recipe_file(tmp_path), "--set", "method=fine-method") == 0
    capsys.readouterr()
    assert cli("validate", recipe_file(tmp_path), "--set", "method=exploding") == 2
    assert capsys.readouterr().err.strip() == (
        "error: --set method: method 'exploding' is installed (trl-plus-exploding (exploding)) but its plugin failed "
        "to register its methods: RuntimeError: the plugin's GPU kernel is missing. Fix or reinstall that plugin "
        "(`trl-plus list --debug` shows the traceback)."
    )


def test_two_plugins_registering_the_same_name_are_both_named(plugins, tmp_path, capsys):
    plugins(FakeEntryPoint("first", Registers("twin")), FakeEntryPoint("second", Registers("twin", "other")))
    write(tmp_path, "pairs.jsonl", GOOD)
    assert cli("validate", recipe_file(tmp_path), "--set", "method=twin") == 2
    assert capsys.readouterr().err.strip() == (
        "error: --set method: method 'twin' is registered by two plugins, trl-plus-first (first) and trl-plus-second "
        "(second): uninstall one of them (`trl-plus plugins` lists what each registers)"
    )
    assert cli("list") == 0
    listed = " ".join(capsys.readouterr().out.split())  # the list wraps long lines
    assert ("second: trl-plus-second (second): DuplicateRegistration: method 'twin' is registered twice: by "
            "trl-plus-first (first) and by trl-plus-second (second)") in listed
    assert cli("validate", recipe_file(tmp_path)) == 0  # dpo still works


# -- security defaults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [None, True])
def test_remote_code_runs_only_when_the_recipe_says_so(tmp_path, monkeypatch, trust):
    import transformers

    from trl_plus.config import load_recipe
    from trl_plus.models.load import load_model, load_tokenizer

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    write(tmp_path, "pairs.jsonl", GOOD)
    extra = ["model.trust_remote_code=true"] if trust else []
    recipe = load_recipe(recipe_file(tmp_path), ["model.dtype=float32", *extra])
    load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    load_model(recipe.model)
    assert seen == [bool(trust)] * 2


def test_recipes_are_read_with_a_safe_loader(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    assert cli("validate", str(path)) == 2
    assert "pwned" not in capsys.readouterr().out


def test_paths_are_read_from_the_recipe_folder_and_errors_show_them_absolute(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    save_tiny_model(project / "models" / "mine")
    write(project, "pairs.jsonl", GOOD)
    recipe = recipe_file(project, model="models/mine")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder: both paths are found from the recipe's
    assert cli("validate", recipe) == 0
    capsys.readouterr()
    recipe = recipe_file(project, data="absent.jsonl")
    assert cli("validate", recipe) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: data.train.path: no such file: absent.jsonl (looked for {project}/absent.jsonl and "
        f"{tmp_path}/absent.jsonl; a relative path in a recipe is read from the recipe's folder, then from the "
        "working directory)"
    )
    assert os.path.isabs(str(project))
