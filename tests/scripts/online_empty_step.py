"""Run under ``accelerate launch --cpu --num_processes 2``: an online method whose filters leave process 0 no
row at the second step. Every process must still run that step (no hang in the gradient all-reduce) and learn
nothing from it; the main process writes the logs and each process's parameter checksum to ``OUTPUT/result.json``."""

from __future__ import annotations

import json
import sys

import torch

from trl_plus import DPO, OnlineMethod, Paper, Rollout, get_registry
from trl_plus.cli import end_process_group
from trl_plus.testing import registered, tiny_trainer, training_logs

TRAINER = []


class Filtering(OnlineMethod, DPO):
    name = "online-filtering-test"
    paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")

    def make_examples(self, rollouts):
        trainer = TRAINER[0]
        if trainer.accelerator.process_index == 0 and trainer.state.global_step == 1:
            return []  # e.g. every pair below a margin
        return super().make_examples(rollouts)


def main(output_dir: str) -> None:
    digits = get_registry().get_scorer("digits")
    prompts = [{"prompt": f"Count to {i}:"} for i in range(16)]
    with registered(Filtering):
        trainer = tiny_trainer(Filtering, output_dir, rows=prompts, max_steps=3, learning_rate=1e-2,
                               training={"per_device_train_batch_size": 2},
                               scorers=[(digits(digits.Config()), 1.0)],
                               rollout=Rollout(n=2, decoding={"max_new_tokens": 6}))  # fmt: skip
        TRAINER.append(trainer)
        trainer.train()
    checksum = sum(p.detach().double().sum() for p in trainer.model.parameters()).reshape(1)
    sums = trainer.accelerator.gather(checksum.to(trainer.accelerator.device)).tolist()
    if trainer.accelerator.is_main_process:
        result = {"logs": training_logs(trainer), "checksums": sums, "processes": trainer.accelerator.num_processes}
        with open(f"{output_dir}/result.json", "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
    end_process_group()
