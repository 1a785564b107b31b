"""Recipes: every error names the file, the key path and the fix; precedence default < YAML < --set."""

from __future__ import annotations

import re

import pytest
import yaml

from trl_plus import TrlPlusError
from trl_plus.config import load_recipe
from trl_plus.run.validate import check_recipe

BASE = {
    "method": "dpo",
    "model": {"name_or_path": "tiny-llama"},
    "data": {"train": {"path": "recipes/data/quickstart_prefs.jsonl"}},
    "training": {"max_steps": 3},
}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def deep(data, **updates):
    out = yaml.safe_load(yaml.safe_dump(data))
    for dotted, value in updates.items():
        node = out
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def error_of(tmp_path, data, overrides=()):
    path = write(tmp_path, data)
    with pytest.raises(TrlPlusError) as info:
        check_recipe(load_recipe(path, list(overrides)))
    message = str(info.value)
    assert message.startswith(path + ": ") or message.startswith("--set"), message
    return message


def test_valid_recipe_resolves_method_defaults(tmp_path):
    method, training = check_recipe(load_recipe(write(tmp_path, BASE)))
    assert method.name == "dpo" and method.config.beta == 0.1
    assert training == {"max_steps": 3}


def test_unknown_training_key_suggests_the_nearest(tmp_path):
    msg = error_of(tmp_path, deep(BASE, training__learnin_rate=1e-3))
    assert msg.endswith("training.learnin_rate: unknown key (did you mean learning_rate?)")


def test_unknown_block_key_suggests_the_nearest(tmp_path):
    msg = error_of(tmp_path, deep(BASE, model__lora={"r": 4, "alpah": 8}))
    assert "model.lora.alpah: unknown key (did you mean alpha?)" in msg
    msg = error_of(tmp_path, deep(BASE, modle={"name_or_path": "x"}))
    assert "modle: unknown key (did you mean model?)" in msg


def test_wrong_types_name_the_key_and_the_expected_type(tmp_path):
    assert "training.max_steps: expected int" in error_of(tmp_path, deep(BASE, training__max_steps="many"))
    assert "model.lora.r:" in error_of(tmp_path, deep(BASE, model__lora={"r": "big"}))
    msg = error_of(tmp_path, deep(BASE, reference={"mode": "copy"}))
    assert "reference.mode:" in msg and "'auto'" in msg and "'precomputed'" in msg


def test_method_args_are_validated_by_the_method(tmp_path):
    msg = error_of(tmp_path, deep(BASE, method_args={"betta": 0.2}))
    assert msg.endswith("method_args.betta: unknown key (did you mean beta?)")
    assert "method_args.beta:" in error_of(tmp_path, deep(BASE, method_args={"beta": "high"}))


def test_unknown_method_lists_the_nearest_names(tmp_path):
    msg = error_of(tmp_path, deep(BASE, method="dp"))
    assert "method: unknown method 'dp' (did you mean dpo" in msg and re.search(r"Installed: .*\bdpo\b", msg)


def test_loss_fields_belong_to_the_method(tmp_path):
    msg = error_of(tmp_path, deep(BASE, training__beta=0.2))
    assert "training.beta: set by trl-plus; use method_args.beta instead" in msg


def test_missing_files_and_models(tmp_path):
    assert "data.train.path: no such file" in error_of(tmp_path, deep(BASE, data__train={"path": "nope.jsonl"}))
    msg = error_of(tmp_path, deep(BASE, model__name_or_path="./no/such/model"))
    assert "model.name_or_path: no such model directory: ./no/such/model" in msg
    with pytest.raises(TrlPlusError, match="no such recipe file"):
        load_recipe(str(tmp_path / "absent.yaml"))


def test_reference_mode_must_fit_the_method_and_model(tmp_path):
    assert "needs model.lora" in error_of(tmp_path, deep(BASE, reference={"mode": "adapter"}))
    assert "needs a reference" in error_of(tmp_path, deep(BASE, reference={"mode": "none"}))


def test_set_overrides_win_over_yaml_and_keep_types(tmp_path):
    path = write(tmp_path, deep(BASE, method_args={"beta": 0.2}))
    recipe = load_recipe(path, ["method_args.beta=0.5", "training.learning_rate=5e-7", "model.lora.r=8"])
    method, training = check_recipe(recipe)
    assert method.config.beta == 0.5
    assert training["learning_rate"] == 5e-7  # "5e-7" (a YAML string) is coerced to the field's float
    assert recipe.model.lora.r == 8
    with pytest.raises(TrlPlusError, match="expected key.path=value"):
        load_recipe(path, ["training.max_steps"])


def test_the_deprecated_gradient_checkpointing_key_is_read_as_activation_checkpointing(tmp_path):
    import warnings

    from trl import DPOConfig

    _, training = check_recipe(load_recipe(write(tmp_path, deep(BASE, training__gradient_checkpointing=False))))
    assert training == {"max_steps": 3, "activation_checkpointing": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert DPOConfig(output_dir=str(tmp_path), use_cpu=True, **training).gradient_checkpointing is False
    both = deep(BASE, training__gradient_checkpointing=True, training__activation_checkpointing=True)
    assert error_of(tmp_path, both).endswith("training.gradient_checkpointing: the deprecated name of "
                                             "activation_checkpointing; set only activation_checkpointing")


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(TrlPlusError, match="not valid YAML"):
        load_recipe(str(path))


@pytest.mark.parametrize("recipe", ["recipes/quickstart-tiny.yaml"])
def test_shipped_core_recipes_validate(recipe):
    check_recipe(load_recipe(recipe))


def test_yaml_booleans_where_a_word_is_expected_say_to_quote_it(tmp_path):
    msg = error_of(tmp_path, BASE, ["training.eval_strategy=no"])
    assert "training.eval_strategy: expected" in msg and "got False" in msg and "quote the word, e.g. 'no'" in msg


def test_a_method_of_a_trainer_kind_this_core_lacks_is_refused_at_validation(tmp_path):
    from trl_plus import Method, Paper, PlusTrainer
    from trl_plus.testing import registered

    class Online(Method):
        name, paper, trainer = "future-online", Paper("A later method", "0000.00000"), "online"

    assert Method.trainer == "preference" and Method().collator(0, None) is None  # None: the core's collator
    with registered(Online):
        message = error_of(tmp_path, deep(BASE, method="future-online"))
        assert message.endswith("r.yaml: method: method 'future-online' runs on a 'online' trainer, which this "
                                "trl-plus does not have (it has: preference, diffusion, group); upgrade trl-plus or the "
                                "plugin")  # fmt: skip
        with pytest.raises(TrlPlusError, match="runs on a 'online' trainer, not on PlusTrainer"):
            PlusTrainer("unused", method="future-online")
        with pytest.raises(TrlPlusError, match="runs on a 'diffusion' trainer, not on PlusTrainer"):
            PlusTrainer("unused", method="diffusion-dpo")


def test_training_key_names_read_from_source_are_the_dataclass_fields():
    import dataclasses

    from trl import DPOConfig

    from trl_plus.run.validate import training_field_names

    assert training_field_names() == {f.name for f in dataclasses.fields(DPOConfig) if f.init}


@pytest.mark.parametrize(
    "key, value, message",
    [("max_steps", -3, "training.max_steps: -3 is not a step count; give a positive number, or -1"),
     ("max_steps", 0, "training.max_steps: 0 is not a step count"),
     ("learning_rate", 0, "training.learning_rate: must be positive, got 0"),
     ("per_device_train_batch_size", -1, "training.per_device_train_batch_size: must be positive"),
     ("warmup_steps", -2, "training.warmup_steps: must be zero or more, got -2")],
)  # fmt: skip
def test_counts_and_rates_out_of_range_are_refused_at_validation(tmp_path, key, value, message):
    assert message in error_of(tmp_path, deep(BASE, training={key: value}))


def test_max_steps_minus_one_means_epochs_and_is_accepted(tmp_path):
    check_recipe(load_recipe(write(tmp_path, deep(BASE, training={"max_steps": -1, "num_train_epochs": 1}))))


def test_a_typo_is_reported_without_importing_torch(tmp_path):
    import subprocess
    import sys
    import textwrap

    path = write(tmp_path, deep(BASE, training={"learnin_rate": 0.1}))
    code = textwrap.dedent(f"""
        import sys, time
        start = time.perf_counter()
        from trl_plus.cli import main
        assert main(["validate", {path!r}]) == 2
        print(time.perf_counter() - start)
        heavy = [name for name in ("torch", "datasets", "peft") if name in sys.modules]
        assert not heavy, f"imported before the typo was reported: {{heavy}}"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "training.learnin_rate: unknown key (did you mean learning_rate?)" in proc.stderr
    # what made it slow (4.8 s before, 0.7 s after on 2 cores) is the imports; a wall-clock bound is flaky in -n auto


def test_lora_target_modules_and_layers_are_checked_against_the_model_before_it_loads(tmp_path, monkeypatch, capsys):
    import transformers

    from trl_plus.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    bad = write(tmp_path, deep(BASE, model={"name_or_path": "tiny-llama", "lora": {"target_modules": ["q_prj"]}}))
    assert main(["validate", bad]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "model.lora.target_modules: tiny-llama has no module named q_prj (did you mean q_proj?) (its linear layers: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"
    )
    layers = write(tmp_path, deep(BASE, model={"name_or_path": "tiny-llama", "lora": {"layers": [1, 5]}}), "l.yaml")
    assert main(["validate", layers]) == 2
    assert "model.lora.layers: tiny-llama has 2 decoder layers (0 to 1); got [1, 5]" in capsys.readouterr().err
    good = write(tmp_path, deep(BASE, model={"name_or_path": "tiny-llama", "lora": {"target_modules": ["q_proj"]}}),
                 "g.yaml")  # fmt: skip
    assert main(["validate", good]) == 0
