"""The real-image quickstart's learning-rate sweep: the rule's score of same-seed samples against the fidelity guard.

Writes the digits data (trl_plus.diffusion.digits), trains the quickstart's SFT reference once (recipes/
quickstart-diffusion-sft.yaml, cached in OUT/sft), then for each learning rate the quickstart's diffusion-dpo
recipe unchanged but for ``training.learning_rate``, and prints one row per run: held-out implicit-reward accuracy,
held-out denoising error, samples' class consistency (the fidelity guard), samples' mean ink and the share of
same-seed samples brighter than the reference's (the rule). Each run's PNG grid lands in OUT/dpo-<lr>-grid.png.

    python bench/bench_digits.py                       # lr 1e-6 3e-6 1e-5 3e-5, ~15 min on 2 cores
    python bench/bench_digits.py --lrs 1e-6 --out runs/bench-digits
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-6, 3e-6, 1e-5, 3e-5])
    parser.add_argument("--out", default="runs/bench-digits")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from trl_plus import train
    from trl_plus.diffusion.digits import quickstart_report, write_digits_data
    from trl_plus.errors import quiet_known_noise

    quiet_known_noise()

    out = Path(args.out)
    files = write_digits_data(out / "data")
    sft = out / "sft"
    if not (sft / "model_index.json").is_file():
        start = time.perf_counter()
        train(ROOT / "recipes" / "quickstart-diffusion-sft.yaml", [f"data.train.path={files['sft']}",
              f"training.output_dir={sft}", "training.save_strategy='no'", "training.disable_tqdm=true"])  # fmt: skip
        print(f"SFT reference: {time.perf_counter() - start:.0f} s")
    rows, reference = [], None
    for lr in args.lrs:
        run = out / f"dpo-{lr:g}"
        start = time.perf_counter()
        train(ROOT / "recipes" / "quickstart-diffusion.yaml", [
            f"model.name_or_path={sft}", f"data.train.path={files['pairs']}", f"data.eval.path={files['held_out']}",
            f"training.output_dir={run}", f"training.learning_rate={lr}", "training.save_strategy='no'",
            "training.eval_strategy='no'", "data.report=false", "training.disable_tqdm=true",
            "training.overwrite_output_dir=true"])  # fmt: skip
        seconds = time.perf_counter() - start
        figures = quickstart_report(sft, run, out / "data", grid=out / f"dpo-{lr:g}-grid.png")
        reference = figures["reference"]
        rows.append((lr, figures["policy"], seconds))
    print("\n| run | implicit acc | held-out error | class consistency | samples' ink | brighter than ref | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    f = reference
    print(f"| SFT reference | {f.implicit_accuracy:.3f} | {f.held_out_mse:.4f} | {f.class_consistency:.3f} | "
          f"{f.sample_ink:+.4f} | {f.brighter:.3f} | |")
    for lr, f, seconds in rows:
        guard = f.held_out_mse <= 1.2 * reference.held_out_mse and \
            f.class_consistency >= reference.class_consistency - 0.05
        print(f"| dpo lr {lr:g}{'' if guard else ' (guard fails)'} | {f.implicit_accuracy:.3f} | {f.held_out_mse:.4f} | "
              f"{f.class_consistency:.3f} | {f.sample_ink:+.4f} | {f.brighter:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
