"""SPRO — Self-Play Reward Optimization (SPRO: Improving Image Generation via Self-Play; arXiv id and official code
not found). A pipeline of existing methods, no new loss:

1. **SPRO-Prompt** (stage 1): text DPO (``dpo``, TRL's sigmoid loss, β = 0.1) of a prompt-writer model on pairs
   (instruction, chosen = the best candidate prompt, rejected = the worst), π_ref = the writer before the round;
2. **the data stage** (this module): per seed caption, the writer's candidate prompts are rendered by a frozen
   diffusion model, scored by an image scorer; best/worst → DPO pairs, the winners' images → SFT rows;
3. **SPRO-Image** (stage 3): ``diffusion-sft`` on (base caption, winner image).

Selection, in a pinned order: (a) candidates failing ``keep`` (the paper's CLIP similarity ≥ 0.75 to the seed
image) are removed; (b) the best and worst of the rest are the pair (ties: the earlier candidate; all equal: none);
(c) the pair is kept only when the winner's reward exceeds the mean reward of the base captions (the appendix's
rule, the card's recommendation). Commands: ``trl-plus spro data`` (or :func:`spro_data`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_plus import DiffusionMethod, Needs, Paper, Rollout, TrlPlusError, hookimpl

#: The prompt writer's input for a seed caption (the paper's objective-specific instruction, shortened).
INSTRUCTION = ("Rewrite this image caption as one detailed prompt (at most 60 words) that makes a more appealing "
               "image: {caption}\nPrompt:")  # fmt: skip

PAPER = Paper("SPRO: Improving Image Generation via Self-Play", None, venue="NeurIPS (listed; arXiv id not found)")


# -- selection (pure) -----------------------------------------------------------------------------------------------
def select_pair(rewards: Sequence[float], keep: Sequence[bool] | None = None) -> tuple[int, int] | None:
    """``(chosen, rejected)`` candidate indices: the filter first (``keep[j]`` false removes candidate j), then the
    highest and the lowest reward of the rest (ties: the earlier index); ``None`` when fewer than two remain or they
    all tie."""
    kept = [j for j in range(len(rewards)) if keep is None or keep[j]]
    if len(kept) < 2:
        return None
    values = [float(rewards[j]) for j in kept]
    if max(values) == min(values):
        return None
    return kept[values.index(max(values))], kept[values.index(min(values))]


def pick_rows(captions: Sequence[str], candidates: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
              base_rewards: Sequence[float], keep: Sequence[Sequence[bool]] | None = None,
              instruction: str = INSTRUCTION) -> tuple[list[dict], list[int]]:  # fmt: skip
    """``(DPO pair rows, the caption index of each)`` from every caption's candidate rewards: :func:`select_pair`
    (filter, then best/worst), then the pair dropped unless the winner's reward > the mean base-caption reward."""
    if not base_rewards:
        raise TrlPlusError("base_rewards: the filter needs the base captions' rewards (one per caption)")
    threshold = sum(float(r) for r in base_rewards) / len(base_rewards)
    pairs, kept = [], []
    for i, caption in enumerate(captions):
        pair = select_pair(rewards[i], None if keep is None else keep[i])
        if pair is None or float(rewards[i][pair[0]]) <= threshold:
            continue
        w, lose = pair
        pairs.append({"prompt": instruction.format(caption=caption), "chosen": candidates[i][w],
                      "rejected": candidates[i][lose], "caption": caption, "chosen_reward": float(rewards[i][w]),
                      "rejected_reward": float(rewards[i][lose]), "base_reward": float(base_rewards[i]),
                      "base_mean": threshold})  # fmt: skip
        kept.append(i)
    return pairs, kept


# -- rendering --------------------------------------------------------------------------------------------------
class _Render(DiffusionMethod):
    """The frozen renderer's sampling settings (not registered: it only lets a DiffusionTrainer sample and score)."""

    name = "spro-render"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "online", "constraint.reference": "reference-free",
                "property": (), "scope": "image", "source": "inferred"}  # fmt: skip
    paper = PAPER
    needs = Needs(reference="no", precomputable_reference=False,
                  rollout=Rollout(n=1, decoding={"steps": 20, "eta": 0.0, "guidance": 1.0}))  # fmt: skip
    data_fields = ("prompt",)
    image_fields = ()

    def make_examples(self, rollouts: Any) -> list[dict[str, Any]]:
        raise TrlPlusError("the SPRO renderer samples, it does not train")


def _scorer(spec: Any) -> Any:
    if isinstance(spec, str):
        from trl_plus import get_registry

        name, _, rest = spec.partition(":")
        cls = get_registry().get_scorer(name.strip())
        args = dict(item.split("=", 1) for item in filter(None, rest.split(",")))
        return cls(cls.Config(**args))
    return spec


def renderer(source: str, prompts: Sequence[str], scorers: Sequence[tuple[Any, float]], *, steps: int = 20,
             guidance: float = 1.0, resolution: int | None = None, dtype: str | None = None) -> Any:  # fmt: skip
    """A :class:`~trl_plus.DiffusionTrainer` that samples the frozen pipeline ``source`` (folder or alias) for
    ``prompts`` (all encoded once) and scores with ``scorers`` ``[(scorer or name, weight)]`` (image scorers)."""
    from trl_plus import DiffusionTrainer, Recipe

    if not scorers:
        raise TrlPlusError("scorers: SPRO ranks rendered images: give an image scorer, e.g. [('brightness', 1.0)]")
    pairs = [(_scorer(s), w) for s, w in (x if isinstance(x, (tuple, list)) else (x, 1.0) for x in scorers)]
    model = {"kind": "diffusion", "name_or_path": source, "resolution": resolution}
    if dtype is not None:
        model.update({"dtype": dtype, "text_encoders": {"dtype": dtype}})
    recipe = Recipe.model_validate({"method": _Render.name, "model": model, "data": {"train": {"path": "seeds"}}})
    rollout = Rollout(n=1, decoding={"steps": int(steps), "eta": 0.0, "guidance": float(guidance)})
    training = {"output_dir": tempfile.mkdtemp(prefix="spro-render-"), "disable_tqdm": True}
    return DiffusionTrainer.from_recipe(recipe, _Render(), training, [{"prompt": p} for p in dict.fromkeys(prompts)],
                                        rollout=rollout, scorers=tuple(pairs))  # fmt: skip


def render_and_score(trainer: Any, prompts: Sequence[str], images: int = 1, seed: int = 0):
    """``(rewards [P] (mean over each prompt's images), latents [P*images, ...], pixels [P*images, C, H, W])`` of
    ``prompts`` rendered by the renderer ``trainer`` from one shared set of ``images`` starts (seeded by ``seed``):
    every prompt of the call gets the same x_T (common random numbers across a caption's candidates)."""
    import torch

    ids = torch.tensor([trainer.prompt_id(p) for p in prompts], dtype=torch.long).repeat_interleave(images)
    start = trainer.initial_noise(images, torch.Generator().manual_seed(seed))
    x_T = start.repeat(len(prompts), *([1] * (start.dim() - 1)))
    latents = trainer.sample_images(ids, x_T, record=False).latents[-1].cpu()
    texts = [p for p in prompts for _ in range(images)]
    scores, weights, _, pixels = trainer.score_images(texts, latents)
    reward = (scores * weights).nansum(-1).view(len(prompts), images).mean(1)
    return reward, latents, pixels if pixels is not None else trainer.decode(latents)


# -- the data stage -------------------------------------------------------------------------------------------------
@dataclass
class SproData:
    """What :func:`spro_data` wrote: the DPO pair rows (``pairs.jsonl``), the SFT rows (``sft.jsonl``, images under
    ``images/``), every candidate's reward (``candidates.jsonl``) and the base captions' mean reward."""

    pairs: list[dict] = field(default_factory=list)
    sft: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    base_mean: float = 0.0
    pairs_path: str = ""
    sft_path: str = ""


def spro_data(source: Any, seeds: Sequence[dict], out_dir: str | Path, scorers: Sequence[Any], *,
              writer: Callable[[str, int], list[str]] | None = None, n: int = 8, steps: int = 20,
              guidance: float = 1.0, images: int = 1, seed: int = 0, resolution: int | None = None,
              dtype: str | None = None, keep: Callable[[str, str, Any], bool] | None = None,
              instruction: str = INSTRUCTION) -> SproData:  # fmt: skip
    """SPRO's data stage (see the module doc) into ``out_dir``: ``pairs.jsonl`` (``prompt`` = the writer's
    instruction, ``chosen`` / ``rejected`` = the best / worst prompt), ``sft.jsonl`` (``prompt`` = the base caption,
    ``image`` = each of the winner's ``images`` renders, ``images/*.png``) and ``candidates.jsonl``.

    ``seeds``: rows with a ``caption`` and, unless ``writer`` is given, their ``candidates`` (prompt texts);
    ``writer(instruction text, n) -> n prompts`` (e.g. :func:`lm_writer` of a stage-1 model); ``source``: a frozen
    pipeline folder / alias, or a renderer :func:`renderer` built; ``scorers``: ``[(scorer or name, weight)]``;
    ``keep(caption, prompt, pixels [images, C, H, W]) -> bool``: the candidate filter (the paper's CLIP similarity to
    the seed image ≥ 0.75; none by default)."""
    if not seeds:
        raise TrlPlusError("seeds: give at least one seed row with a caption")
    captions, candidates = [], []
    for i, row in enumerate(seeds):
        caption = row.get("caption") if isinstance(row, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise TrlPlusError(f"seeds.{i}: each seed row needs a non-empty 'caption' string")
        listed = row.get("candidates")
        if writer is not None:
            listed = [p for p in writer(instruction.format(caption=caption), n) if p.strip()]
        if not isinstance(listed, list) or len(listed) < 2 or not all(isinstance(p, str) and p for p in listed):
            raise TrlPlusError(f"seeds.{i}: 'candidates' must list at least two prompt strings (or pass a writer)")
        captions.append(caption)
        candidates.append(listed)
    everything = [*captions, *(p for listed in candidates for p in listed)]
    trainer = source if hasattr(source, "text_cache") else renderer(str(source), everything, scorers, steps=steps,
                                                                    guidance=guidance, resolution=resolution,
                                                                    dtype=dtype)  # fmt: skip
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rewards, base, keeps, renders, table = [], [], [], [], []
    for i, caption in enumerate(captions):
        prompts = [caption, *candidates[i]]
        reward, _, pixels = render_and_score(trainer, prompts, images, seed + i)
        pixels = pixels.view(len(prompts), images, *pixels.shape[1:])
        base.append(float(reward[0]))
        rewards.append([float(r) for r in reward[1:]])
        keeps.append([True if keep is None else bool(keep(caption, p, pixels[1 + j]))
                      for j, p in enumerate(candidates[i])])  # fmt: skip
        renders.append(pixels[1:])
        table += [{"caption": caption, "prompt": p, "reward": rewards[-1][j], "kept": keeps[-1][j],
                   "base_reward": base[-1]} for j, p in enumerate(candidates[i])]  # fmt: skip
    pairs, kept = pick_rows(captions, candidates, rewards, base, keeps, instruction)
    from trl_plus import save_image

    sft = []
    for pair, i in zip(pairs, kept):
        winner = candidates[i].index(pair["chosen"])
        for j, image in enumerate(renders[i][winner]):
            name = f"images/{i:04d}-{j}.png"
            save_image(image, out / name)
            sft.append({"prompt": captions[i], "image": name, "reward": pair["chosen_reward"],
                        "winner_prompt": pair["chosen"]})  # fmt: skip
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "candidates.jsonl", table)
    return SproData(pairs, sft, table, sum(base) / len(base), str(out / "pairs.jsonl"), str(out / "sft.jsonl"))


def lm_writer(model: Any, tokenizer: Any, max_new_tokens: int = 60, temperature: float = 1.0, seed: int | None = 0):
    """A ``writer(instruction, n)`` of a causal LM (e.g. ``trl_plus.load_run(stage_1_run)[:2]``): ``n`` sampled
    completions, stripped (:func:`spro_data` drops empty ones); ``seed``: call j samples under ``seed + j`` (the
    torch RNG; ``None``: unseeded)."""
    import torch

    calls = [0]

    def write(text: str, n: int) -> list[str]:
        if seed is not None:
            torch.manual_seed(seed + calls[0])
        calls[0] += 1
        ids = tokenizer([text] * n, return_tensors="pt").to(model.device)
        with torch.no_grad():
            tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return [o.strip() for o in tokenizer.batch_decode(tokens[:, ids["input_ids"].size(1):],
                                                           skip_special_tokens=True)]  # fmt: skip

    return write


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# -- the command ----------------------------------------------------------------------------------------------------
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("seeds", help="jsonl of seed rows: caption (and candidates, unless --writer)")
    parser.add_argument("--model", required=True, help="the frozen diffusion pipeline (folder or alias)")
    parser.add_argument("--out", required=True, help="the folder for pairs.jsonl, sft.jsonl and images/")
    parser.add_argument("--scorer", action="append", default=[], help="an image scorer NAME[:key=value,...] "
                        "(repeatable)")  # fmt: skip
    parser.add_argument("--weight", action="append", type=float, default=[], help="each scorer's weight (default 1)")
    parser.add_argument("--writer", help="a finished stage-1 run (trl-plus train output_dir) writing the candidates")
    parser.add_argument("--n", type=int, default=8, help="candidates per caption from --writer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=1, help="renders per prompt (their mean reward ranks it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--dtype")


def _run(args: argparse.Namespace) -> int:
    path = Path(args.seeds)
    if not path.is_file():
        raise TrlPlusError(f"seeds: {path} is not a file of seed rows (jsonl with a caption per row)")
    seeds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if args.weight and len(args.weight) != len(args.scorer):
        raise TrlPlusError(f"--weight: {len(args.weight)} weights for {len(args.scorer)} scorers: give one per --scorer")
    scorers = list(zip(args.scorer, args.weight or [1.0] * len(args.scorer)))
    writer = None
    if args.writer:
        from trl_plus import load_run

        model, tokenizer, _ = load_run(args.writer)
        writer = lm_writer(model, tokenizer)
    done = spro_data(args.model, seeds, args.out, scorers, writer=writer, n=args.n, steps=args.steps,
                     guidance=args.guidance, images=args.images, seed=args.seed, resolution=args.resolution,
                     dtype=args.dtype)  # fmt: skip
    print(f"{len(done.pairs)} pairs of {len(seeds)} captions kept (base-caption mean reward {done.base_mean:.6f}): "
          f"{done.pairs_path}; {len(done.sft)} SFT rows: {done.sft_path}")  # fmt: skip
    return 0


@hookimpl
def register_commands(register):
    """``trl-plus spro data``."""
    register("spro data", "SPRO's data stage: render candidate prompts, score, write DPO pairs and SFT rows",
             _add_arguments, _run)  # fmt: skip
