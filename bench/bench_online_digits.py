"""Online diffusion on real images (issue 19): D3PO from the digits quickstart's SFT reference, rewarded by the
``brightness`` of its own samples, and the quickstart's table before and after (the fidelity guard included).

A benchmark, not a test. Stage 1 is the quickstart's: ``recipes/quickstart-diffusion-sft.yaml`` (the tiny-digits UNet
after diffusion-sft on the 1,400 training digits; ``make quickstart-diffusion`` writes it to
``runs/quickstart-diffusion/sft``, ``tests/test_digits.py`` caches it under ``$TRL_PLUS_CACHE/models/digits-sft-*``).
Stage 2 here: ``recipes/quickstart-diffusion-online.yaml``, ``d3po`` (official loss, β 0.1, clip 0.1) fully fine-tuned with a frozen copy of the reference, on the
prompts "digit 0" .. "digit 9": every step samples ``--prompts`` prompts × 2 images from one shared x_T with DDIM
(``--sample-steps`` steps, η 1, no guidance: the SFT model never saw an empty prompt), labels each pair by
``brightness`` (the mean pixel value: a rule reward of the digits' ink) and trains on every recorded step.

It prints, per learning rate, the figures of ``python -m trl_plus.diffusion.digits report`` for the reference and
the policy — held-out implicit-reward accuracy on the ink pairs (which D3PO never sees), held-out denoising error,
class consistency of 200 same-seed DDIM samples, their mean ink (= 2·brightness − 1) and the share brighter than the
reference's same-seed sample — plus the generation-side reward of the run (``rollout/reward``, first and last
logged) and the wall time.

    python bench/bench_online_digits.py                       # lr 1e-5, 3e-5; 60 steps of 10 prompts
    python bench/bench_online_digits.py --lrs 1e-5 --steps 20 # one short run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def reference_folder(given: str | None) -> Path:
    """The SFT reference: ``--reference``, else the quickstart's run folder, else the test suite's cached copy."""
    from trl_plus.models.cache import cache_dir

    candidates = [Path(given)] if given else [Path("runs/quickstart-diffusion/sft"),
                                              *sorted((cache_dir() / "models").glob("digits-sft-*"))]  # fmt: skip
    for folder in candidates:
        if (folder / "model_index.json").is_file():
            return folder
    sys.exit("no digits SFT reference: run `make quickstart-diffusion` (or pass --reference DIR)")


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart-diffusion-online.yaml"


def run(reference: Path, out: Path, lr: float, steps: int, prompts: int, sample_steps: int, seed: int) -> dict:
    """``recipes/quickstart-diffusion-online.yaml`` with these settings; the run's seconds and first / last logged
    ``rollout/reward``."""
    from trl_plus import train
    from trl_plus.errors import quiet_known_noise

    quiet_known_noise()
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"digit {i % 10}"}) + "\n" for i in range(10 * prompts)))
    start = time.perf_counter()
    train(str(RECIPE), [f"model.name_or_path={reference}", f"data.train.path={data}",
                        f"training.output_dir={out / 'run'}", f"training.learning_rate={lr}",
                        f"training.max_steps={steps}", f"training.per_device_train_batch_size={prompts}",
                        f"rollout.decoding.steps={sample_steps}", f"training.seed={seed}",
                        "training.disable_tqdm=true"])  # fmt: skip
    seconds = time.perf_counter() - start
    logs = json.loads((out / "run" / "trainer_state.json").read_text())["log_history"]
    rewards = [h["rollout/reward"] for h in logs if "rollout/reward" in h]
    return {"seconds": seconds, "reward_first": rewards[0], "reward_last": rewards[-1]}


def main(argv=None) -> int:
    from trl_plus.diffusion.digits import (
        format_figures,
        quickstart_report,
        same_seed_samples,
        write_blocks,
        write_digits_data,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="the SFT pipeline folder (default: the quickstart's or the cached one)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=10, help="prompts per step (2 images each)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--picture", help="also write a PNG: 2 rows of same-seed samples of the reference, then of "
                                          "each learning rate's policy (docs/online-digits.png)")
    args = parser.parse_args(argv)
    reference = reference_folder(args.reference)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        write_digits_data(root / "data")
        print(f"reference: {reference}")
        for lr in args.lrs:
            out = root / f"lr{lr:g}"
            out.mkdir(parents=True, exist_ok=True)
            figures = run(reference, out, lr, args.steps, args.prompts, args.sample_steps, args.seed)
            table = quickstart_report(reference, out / "run", root / "data", grid=out / "samples.png")
            print(f"\n## lr {lr:g}: {args.steps} steps x {args.prompts} prompts x 2 images, {args.sample_steps} "
                  f"sampler steps; {figures['seconds']:.0f} s; rollout/reward (brightness) "
                  f"{figures['reward_first']:.4f} (first log) -> {figures['reward_last']:.4f} (last)")
            print(format_figures(table))
        if args.picture:
            folders = [reference, *(root / f"lr{lr:g}" / "run" for lr in args.lrs)]
            write_blocks([same_seed_samples(folder, samples=20) for folder in folders], args.picture, rows=2)
            print(f"\nsame-seed samples, reference then lr {', '.join(f'{lr:g}' for lr in args.lrs)}: {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
