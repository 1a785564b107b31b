"""``trl-plus merge RUN_DIR``: a LoRA run's adapter merged into its base model, the start of a second stage."""

from __future__ import annotations

from pathlib import Path

from ..config import load_recipe
from ..errors import TrlPlusError
from ..models.load import load_model, load_tokenizer
from .rundir import RESOLVED_RECIPE


def merge_adapter(run_dir: str | Path, output: str | Path | None = None) -> str:
    """Merge the LoRA adapter of a finished run into its base model and save a plain checkpoint (with tokenizer).

    The base is the run's ``model`` block (``trl_plus_recipe.yaml``) loaded without quantization, in the recipe's
    dtype, so a QLoRA run merges into 16-bit weights. Returns the output directory (default ``RUN_DIR-merged``):
    the starting model of a second stage (e.g. REDI after SFT).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "adapter_config.json").is_file():
        raise TrlPlusError(f"{run_dir}: no adapter_config.json; only a LoRA run's output_dir can be merged")
    if not (run_dir / RESOLVED_RECIPE).is_file():
        raise TrlPlusError(f"{run_dir}: no {RESOLVED_RECIPE}; is this the output_dir of a trl-plus train run?")
    from peft import PeftModel

    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    base = load_model(recipe.model.model_copy(update={"quantization": None, "lora": None}), trainable=False)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    output = Path(output) if output else run_dir.with_name(run_dir.name + "-merged")
    merged.save_pretrained(output)
    load_tokenizer(str(run_dir)).save_pretrained(output)
    return str(output)
