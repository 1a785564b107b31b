"""Run under ``accelerate launch --multi_gpu --num_processes 2`` on CPUs: a group method that records the gathered
rollouts and TRL's baseline advantages its advantages() hook sees; each process writes them to
``OUTPUT/rank<r>.json``."""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from trl_plus import GroupMethod, Paper, Rollout, get_registry
from trl_plus.cli import end_process_group
from trl_plus.models.tiny import build_model, build_tokenizer
from trl_plus.trainers.group import PlusGRPOTrainer

SEEN = {"rollouts": [], "baselines": []}


class Recording(GroupMethod):
    name = "group-two-processes-test"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")

    def advantages(self, rollouts, baseline):
        SEEN["rollouts"].append({"ids": rollouts.completion_ids, "scores": rollouts.scores[:, 0].tolist(),
                                 "group": rollouts.group.tolist()})  # fmt: skip
        SEEN["baselines"].append(baseline.tolist())
        return None


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer()
    digits = get_registry().get_scorer("digits")
    args = GRPOConfig(output_dir=output_dir, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
                      logging_steps=1, report_to="none", save_strategy="no", bf16=False, disable_tqdm=True, seed=0,
                      use_cpu=True, activation_checkpointing=False, dataloader_pin_memory=False)  # fmt: skip
    trainer = PlusGRPOTrainer(build_model(tokenizer), method=Recording, args=args,
                              train_dataset=Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(16)]),
                              processing_class=tokenizer, scorers=[(digits(digits.Config()), 1.0)],
                              rollout=Rollout(n=4, decoding={"max_new_tokens": 8, "temperature": 1.0}))  # fmt: skip
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{output_dir}/rank{rank}.json", "w") as f:
        json.dump({**SEEN, "processes": trainer.accelerator.num_processes}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
    end_process_group()
