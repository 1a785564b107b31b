"""``training.report_to: [tensorboard]`` writes event files with the method's own metrics, one value per logged step,
equal to the log history's; a missing package is named by validation, before any model loads."""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import pytest

from trl_plus.testing import preference_rows, train_tiny, training_logs


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files under ``folder``: ``{tag: {step: value}}``. An event file is a
    TFRecord stream (length, its CRC, an ``Event`` protobuf, its CRC); tensorboardX's protobufs parse the events."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    for file in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = value.simple_value
    return scalars


@pytest.mark.parametrize(("method", "own_metric"), [("dpo", "rewards/margins"), ("sft", "sft/nll")])
def test_tensorboard_event_files_hold_the_methods_metrics(tmp_path, method, own_metric):
    pytest.importorskip("tensorboardX", reason='report_to: tensorboard needs tensorboardX: pip install -e ".[dev]"')
    rows = [{**row, "completion": row["chosen"]} for row in preference_rows(32)] if method == "sft" else None
    trainer = train_tiny(method, tmp_path, rows=rows, max_steps=3, training={"report_to": ["tensorboard"]})
    scalars = read_scalars(tmp_path / "runs")  # transformers' folder: output_dir/runs/<date>_<host>
    logs = training_logs(trainer)
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert f"train/{own_metric}" in scalars and "train/loss" in scalars
    for entry in logs:
        for key, value in entry.items():
            if key != "step":
                assert scalars[f"train/{key}"][entry["step"]] == pytest.approx(value, rel=1e-6), key
    assert set(scalars["train/loss"]) == {1, 2, 3}  # one value per logged step


def test_a_missing_logger_package_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import trl_plus.run.validate as validate
    from trl_plus import load_recipe

    monkeypatch.setattr(validate, "_installed", lambda module: module not in {"tensorboard", "tensorboardX"})
    recipe = load_recipe("recipes/quickstart-tiny.yaml", ["training.report_to=[tensorboard]",
                                                          f"training.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(validate.TrlPlusError) as error:
        validate.check_recipe(recipe)
    assert str(error.value) == ('--set training.report_to: tensorboard needs the package tensorboardX: '
                                'pip install "trl-plus[tensorboard]"')  # fmt: skip
    monkeypatch.setattr(validate, "_installed", lambda module: module == "tensorboardX")
    validate.check_recipe(recipe)  # either package will do
