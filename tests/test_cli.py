"""The `trl-plus` command: fast listing, clear one-line errors, broken plugins, train end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from trl_plus.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "trl_plus", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_help_and_list_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from trl_plus.cli import main
        main(["list"])
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "heavy import"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "dpo" in proc.stdout and "offline-pairwise" in proc.stdout and "2305.18290" in proc.stdout
    assert run("--help").stdout.count("train") >= 1


def test_list_fits_100_columns_and_wide_shows_everything(capsys):
    from trl_plus.registry import REPOSITORY_PLUGINS, get_registry

    registry = get_registry()
    sources = [*registry.sources.values(), *registry.component_sources.values(),
               *(c.source for c in registry.commands.values())]
    plugins = {source.rsplit("(", 1)[-1].rstrip(")") for source in sources}
    assert {"dpo", "sft"} <= set(registry.methods) and REPOSITORY_PLUGINS <= plugins  # each registers something
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    for name, cls in registry.methods.items():
        assert any(line.startswith(f"{name} ") for line in lines), name
        assert any((f"arXiv {cls.paper.arxiv}" if cls.paper.arxiv else cls.paper.venue) in line for line in lines), name
    assert main(["list", "--wide"]) == 0
    wide = capsys.readouterr().out
    for name, cls in registry.methods.items():
        row = next(line for line in wide.splitlines() if line.startswith(f"{name} "))
        assert cls.paper.title in row and registry.sources[name] in row and cls.needs.describe() in row


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    """``trl-plus list | head -3``: the reader leaves early; no BrokenPipeError traceback."""

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list"]) == 141  # 128 + SIGPIPE, what a shell reports for a command a pipe closed on
    assert capsys.readouterr().err == ""


def test_show_lists_every_hyperparameter_with_its_default(capsys):
    assert main(["show", "dpo"]) == 0
    out = capsys.readouterr().out
    for line in ("beta", "0.1", "loss_type", "'sigmoid'", "label_smoothing", "ipo_normalize_by_length"):
        assert line in out
    assert "columns prompt, chosen, rejected" in out
    recipe = yaml.safe_load(out.split("example recipe:\n", 1)[1])
    assert recipe["method"] == "dpo" and recipe["method_args"]["beta"] == 0.1


def test_bad_input_is_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: {path: x.jsonl}}\n"
                   "training: {learnin_rate: 0.1}\n")  # fmt: skip
    proc = run("validate", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: training.learnin_rate: unknown key (did you mean learning_rate?)"
    proc = run("show", "simpoo", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown method 'simpoo'" in proc.stderr
    proc = run("--debug", "show", "simpoo", check=False)
    assert "Traceback" in proc.stderr


def test_missing_column_is_named_before_any_model_loads(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    proc = run("validate", "recipes/quickstart-tiny.yaml", "--set", f"data.train.path={data}", "--set", "data.eval=null",
               check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "missing column 'rejected': method 'dpo' needs prompt, chosen, rejected; the data has prompt, chosen" in (
        proc.stderr
    )


def test_a_plugin_that_fails_to_import_is_listed_and_named_when_asked_for(tmp_path):
    dist = tmp_path / "trl_plus_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: trl-plus-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trl_plus]\nbroken = trl_plus_broken_module_that_is_missing\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = run("list", env=env).stdout
    assert "dpo" in out and "broken plugins" in out
    assert "broken: trl-plus-broken (broken): ModuleNotFoundError" in out
    proc = run("validate", "recipes/quickstart-tiny.yaml", "--set", "method=broken", env=env, check=False)
    assert proc.returncode == 2 and "its plugin failed to import: ModuleNotFoundError" in proc.stderr


def test_train_writes_model_recipe_and_state(tmp_path):
    proc = run("train", "recipes/quickstart-tiny.yaml", "--set", f"training.output_dir={tmp_path}",
               "--set", "training.max_steps=6", "--set", "training.eval_steps=3", "--set", "training.save_steps=3")  # fmt: skip
    assert "finished after 6 steps" in proc.stdout and "reward accuracy" in proc.stdout
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())
    assert resolved["method_args"]["beta"] == 0.1 and resolved["training"]["max_steps"] == 6
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and any("eval_rewards/margins" in e for e in state["log_history"])
    assert (tmp_path / "checkpoint-6").is_dir()


def test_train_runs_unchanged_under_accelerate_launch(tmp_path):
    """Two CPU processes (DDP over gloo): one summary, one set of outputs, the same recipe, and each step takes a
    batch per process (``accelerate launch --cpu`` would start one process; ``--multi_gpu`` on a machine without
    GPUs starts two, which trl-plus runs on the CPU)."""
    from trl_plus.testing import launch

    proc = launch("-m", "trl_plus", "train", "recipes/quickstart-tiny.yaml", "--set", f"training.output_dir={tmp_path}",
                  "training.max_steps=4", "data.eval=null", "training.disable_tqdm=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished after 4 steps") == 1
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (tmp_path / "model.safetensors").exists()
    assert state["epoch"] == pytest.approx(4 * 8 * 2 / 256)  # 4 steps × 8 rows × 2 processes of 256 rows


def test_set_takes_several_values_after_one_flag_and_repeats():
    from trl_plus.cli import build_parser

    args = build_parser().parse_args(["train", "r.yaml", "--set", "a=1", "b.c=2", "--set", "d=3"])
    assert args.set == ["a=1", "b.c=2", "d=3"]


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    import pytest

    from trl_plus import TrlPlusError

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: {path: x.jsonl}}\n"
                   "training: {learnin_rate: 0.1}\n")  # fmt: skip
    assert main(["validate", str(bad)]) == 2
    with pytest.raises(TrlPlusError, match="learnin_rate"):
        main(["validate", str(bad), "--debug"])
    with pytest.raises(TrlPlusError, match="learnin_rate"):
        main(["--debug", "validate", str(bad)])


def test_a_typo_in_set_is_blamed_on_set_not_on_the_file(capsys):
    recipe = "recipes/quickstart-tiny.yaml"
    cases = {
        "training.learnin_rate=1": "error: --set training.learnin_rate: unknown key (did you mean learning_rate?)",
        "model.name_or_pth=x": "error: --set model.name_or_pth: unknown key (did you mean name_or_path?)",
        "method_args.bta=1": "error: --set method_args.bta: unknown key (did you mean beta?)",
        "training.max_steps=-3": "error: --set training.max_steps: -3 is not a step count",
        "method=dpoo": "error: --set method: unknown method 'dpoo' (did you mean dpo",
    }
    for override, expected in cases.items():
        assert main(["validate", recipe, "--set", override]) == 2
        assert capsys.readouterr().err.strip().startswith(expected), override


def test_data_paths_in_a_recipe_are_read_from_the_recipe_folder(tmp_path, capsys, monkeypatch):
    from trl_plus.testing import preference_rows, write_jsonl

    folder = tmp_path / "project"
    folder.mkdir()
    write_jsonl(preference_rows(8), folder / "pairs.jsonl")
    recipe = folder / "r.yaml"
    recipe.write_text("method: dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: {path: pairs.jsonl}}\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()
    recipe.write_text("method: dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: {path: absent.jsonl}}\n")
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: data.train.path: no such file: absent.jsonl (looked for {folder}/absent.jsonl and "
        f"{tmp_path}/absent.jsonl; a relative path in a recipe is read from the recipe's folder, then from the working "
        "directory)"
    )


def test_an_unknown_method_suggests_installed_names_and_only_real_install_lines():
    proc = run("show", "simpoo", check=False)
    assert "(did you mean simpo" in proc.stderr and "pip install" not in proc.stderr
    proc = run("show", "simpo", env={"TRL_PLUS_PLUGINS": ""}, check=False)  # a repository plugin, not loaded
    assert proc.returncode == 2
    assert "It is a plugin of the trl-plus repository: `pip install -e plugins/simpo` in a checkout." in proc.stderr


def test_list_json_show_json_and_plugins_give_tooling_the_same_facts(capsys):
    from trl_plus.registry import get_registry

    assert main(["list", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == set(get_registry().methods)
    simpo = records["simpo"]
    assert simpo["paper"]["arxiv"] == "2405.14734" and simpo["needs"]["reference"] == "no"
    assert simpo["source"] == "trl-plus-simpo (simpo)" and simpo["trainer"] == "preference"
    beta = next(h for h in simpo["hyperparameters"] if h["name"] == "beta")
    assert beta["type"] == "float" and beta["default"] == get_registry().methods["simpo"].Config().beta
    assert main(["show", "simpo", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in shown.items() if k != "example_recipe"} == simpo
    assert yaml.safe_load(shown["example_recipe"])["method"] == "simpo"
    assert main(["plugins", "--json"]) == 0
    plugins = json.loads(capsys.readouterr().out)
    assert plugins[0]["distribution"] == "trl-plus" and plugins[0]["methods"] == [
        "diffusion-dpo", "diffusion-sft", "dpo", "grpo", "sft"]
    assert "tiny-llama" in plugins[0]["model_aliases"]
    by_name = {p["distribution"]: p for p in plugins}
    assert by_name["trl-plus-simpo"]["methods"] == ["simpo"] and by_name["trl-plus-simpo"]["version"] == "0.1.0"
    assert main(["plugins"]) == 0
    assert "trl-plus-simpo" in capsys.readouterr().out
