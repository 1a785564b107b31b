"""Online diffusion core: the recording sampler against diffusers' own schedulers (DDIM(η) with the same variance
noise, flow Euler), its step log-densities (recorded = recomputed, the log-ratio = the weighted error difference of
the design note's §1.4), seeding, guidance hooks, lagged/EMA parameter states, the DiffusionTrainer's rollout stage
(rows, rollout.every, chunked backward, identical runs, transitions scored as step densities, checkpoints) and the
one-line errors of bad sampler settings and scorers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from trl_plus import (
    DiffusionDPO,
    ImageRollouts,
    Needs,
    ParameterState,
    Rollout,
    Scoring,
    TrlPlusError,
    ddim_step_logp,
    denoise,
    get_registry,
    implied_noise,
    load_recipe,
    reward_guidance,
    sample,
)
from trl_plus.testing import tiny_diffusion_bundle, tiny_diffusion_trainer, tiny_recipe, tiny_text_encoder

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False)  # fmt: skip


def scorer(name, **args):
    return get_registry().get_scorer(name)(args)


class OnlineDPO(DiffusionDPO):
    """Diffusion-DPO on the policy's own samples (the core's default make_examples: best vs worst of each prompt)."""

    name = "online-diffusion-dpo-test"
    needs = Needs(reference="yes", precomputable_reference=False,
                  rollout=Rollout(n=4, decoding={"steps": 4, "eta": 1.0}))  # fmt: skip
    data_fields, image_fields = ("prompt",), ()


class Transitions(DiffusionDPO):
    """Pairs of stored sampler steps scored as step log-densities (D3PO's data without its clip)."""

    name = "transitions-test"
    needs = Needs(reference="yes", precomputable_reference=False,
                  rollout=Rollout(n=2, decoding={"steps": 3, "eta": 1.0, "guidance": 2.0}))  # fmt: skip
    scoring = Scoring(targets=("epsilon",), source="transitions")
    record, share_start = True, True

    def make_examples(self, rollouts: ImageRollouts):
        trajectory, rows = rollouts.trajectory, []
        for g in range(rollouts.num_groups):
            a, b = rollouts.rows_of(g)
            for j in range(trajectory.steps):
                rows.append({"prompt_id": int(rollouts.prompt_ids[a]), "transition": {
                    "x_t": trajectory.latents[j, [a, b]], "x_prev": trajectory.latents[j + 1, [a, b]],
                    "timestep": trajectory.timesteps[j].repeat(2), "prev_timestep": trajectory.prev_timesteps[j].repeat(2)}})
        return rows


PROMPTS = [{"prompt": f"prompt {i % 3}"} for i in range(6)]


def online_trainer(tmp_path, method=OnlineDPO, scorers=("latent-mean",), **kwargs):
    kwargs.setdefault("max_steps", 2)
    kwargs.setdefault("learning_rate", 1e-3)
    return tiny_diffusion_trainer(method, tmp_path, lora=True, rows=PROMPTS, scorers=[(scorer(s), 1.0) for s in scorers],
                                  method_args={"beta": 500.0}, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def unet():
    return tiny_diffusion_bundle().denoiser.eval()


@pytest.fixture(scope="module")
def cond():
    return {"text": tiny_text_encoder()(["a red circle", "a blue square"])["text"]}


# -- the sampler --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_sampler_reproduces_diffusers_step_with_the_same_variance_noise(unet, cond, prediction):
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample(unet, scheduler, x_T, cond, 10, eta=1.0, generator=torch.Generator().manual_seed(2))
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    noise, x = torch.Generator().manual_seed(2), x_T.clone()
    for j, t in enumerate(ddim.timesteps):
        with torch.no_grad():
            output = denoise(unet, x, t.expand(2), cond)
        x = ddim.step(output, t, x, eta=1.0, variance_noise=torch.randn(x.shape, generator=noise)).prev_sample
        assert torch.allclose(ours.latents[j + 1], x, atol=1e-6, rtol=0)
        assert torch.allclose(ours.predictions[j], output, atol=1e-6, rtol=0)
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()
    assert ours.logps.shape == (10, 2) and torch.isfinite(ours.logps).all()
    # set_alpha_to_one (the DDPM default): the last step lands on ᾱ = 1 with σ = 0, a point mass recorded as 0
    assert ours.logps[-1].abs().max() == 0 and ours.logps[:-1].abs().min() > 0


def test_step_log_densities_recomputed_and_as_weighted_error_differences(unet, cond):
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    record = sample(unet, scheduler, x_T, cond, 20, eta=1.0, generator=torch.Generator().manual_seed(4))
    other = tiny_diffusion_bundle(seed=1).denoiser.eval()
    for j in (0, 6, 18):  # step 19 lands on ᾱ = 1: deterministic, no density
        x_t, x_prev = record.latents[j], record.latents[j + 1]
        t, prev = record.timesteps[j].expand(2), record.prev_timesteps[j].expand(2)
        with torch.no_grad():
            mine, theirs = denoise(unet, x_t, t, cond), denoise(other, x_t, t, cond)
        logp = ddim_step_logp(scheduler, x_t, mine, x_prev, t, prev, 1.0)
        assert torch.allclose(logp, record.logps[j], atol=1e-6, rtol=0)
        eps, weight = implied_noise(scheduler, x_t, x_prev, t, prev, 1.0)
        errors = [((p - eps) ** 2).flatten(1).mean(1) for p in (mine, theirs)]
        ratio = logp - ddim_step_logp(scheduler, x_t, theirs, x_prev, t, prev, 1.0)
        assert torch.allclose(ratio, -weight * (errors[0] - errors[1]), atol=1e-6, rtol=1e-5)


def test_flow_sampler_reproduces_diffusers_euler_steps():
    bundle = tiny_diffusion_bundle("flow")
    model, scheduler = bundle.denoiser.eval(), bundle.scheduler
    encoded = tiny_text_encoder(pooled=True, hidden=64)(["a", "b"])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = sample(model, scheduler, x_T, encoded, 6, eta=0.0)
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(6)
    x = x_T.clone()
    for t in reference.timesteps:
        with torch.no_grad():
            v = denoise(model, x, t.expand(2), encoded)
        x = reference.step(v, t, x).prev_sample
    assert torch.allclose(ours.latents[-1], x, atol=1e-5, rtol=0)
    assert ours.logps is None and ours.sigmas[-1] == 0


def test_sampling_is_seeded_and_a_zero_guidance_hook_changes_nothing(unet, cond):
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    runs = [sample(unet, scheduler, x_T, cond, 5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].latents, runs[1].latents)
    guided = sample(unet, scheduler, x_T, cond, 5, generator=torch.Generator().manual_seed(7),
                    guidance_fn=lambda x, t, output, step: output)  # fmt: skip
    assert torch.equal(guided.latents, runs[0].latents)
    branch = sample(unet, scheduler, runs[0].latents[2], cond, 5, start=2, stop=3,
                    noise=torch.zeros(1, 2, 4, 8, 8))  # fmt: skip
    assert branch.latents.shape[0] == 2 and branch.timesteps.tolist() == runs[0].timesteps[2:3].tolist()


def test_reward_guidance_follows_the_flow_nrg_formula():
    # the Flow-NRG card's worked example: v = [0.2, −0.1], ∇r = [0.3, 0.35] (two weighted heads), t = 0.6
    def reward(x, sigma):
        return (x * torch.tensor([0.3, 0.35])).sum(-1)

    guide = reward_guidance(reward, 1.0)
    v = guide(torch.tensor([[0.3, 0.7]]), torch.tensor([600.0]), torch.tensor([[0.2, -0.1]]), 0)
    assert v.tolist()[0] == pytest.approx([-0.25, -0.625], abs=1e-6)
    assert torch.equal(reward_guidance(reward, 0.0)(None, None, v, 0), v)


def test_parameter_states_copy_average_and_swap(tmp_path):
    trainer = online_trainer(tmp_path)
    model = trainer.policy()
    state = ParameterState(model)
    name = state.names[0]
    before = dict(model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)
    state.update(model, decay=0.75)
    assert torch.allclose(state.tensors[name], before + 0.25)
    with state.applied(model):
        assert torch.allclose(dict(model.named_parameters())[name], before + 0.25)
    assert torch.allclose(dict(model.named_parameters())[name], before + 1.0)
    state.update(model)
    assert torch.equal(state.tensors[name], before + 1.0)
    assert all("lora" in n for n in state.names)  # under LoRA: the adapter's tensors only, never the base


# -- the rollout stage --------------------------------------------------------------------------------------------
def test_rollouts_are_group_major_scored_and_make_best_worst_pairs(tmp_path):
    trainer = online_trainer(tmp_path, scorers=("latent-mean", "brightness"))
    rollouts = trainer.sample_rollouts(torch.tensor([1, 2]))
    assert rollouts.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and rollouts.latents.shape == (8, 4, 8, 8)
    assert rollouts.score_names == ("latent-mean", "brightness") and rollouts.scores.shape == (8, 2)
    assert torch.allclose(rollouts.scores[:, 0], rollouts.latents.flatten(1).mean(1).double(), atol=1e-6)
    assert torch.allclose(rollouts.images.flatten(1).mean(1).double(), rollouts.scores[:, 1], atol=1e-6)
    rows = trainer.method.make_examples(rollouts)
    reward = rollouts.reward()
    for g, row in enumerate(rows):
        members = rollouts.rows_of(g)
        assert torch.equal(row["x0"][0], rollouts.latents[members[int(reward[members].argmax())]])
        assert torch.equal(row["x0"][1], rollouts.latents[members[int(reward[members].argmin())]])
    shared = trainer.sample_rollouts(torch.tensor([1]), share_start=True, record=True)
    assert torch.equal(shared.trajectory.latents[0, 0], shared.trajectory.latents[0, 3])


def test_online_diffusion_dpo_raises_the_generation_side_reward(tmp_path):
    # best-vs-worst pairs of the policy's own samples under latent-mean (the core's default make_examples); measured
    # on this machine: 0.8968 -> 1.0258 after 40 steps
    rows = [{"prompt": f"prompt {i % 4}"} for i in range(16)]
    trainer = tiny_diffusion_trainer(OnlineDPO, tmp_path, lora=True, rows=rows, max_steps=40, learning_rate=1e-2,
                                     batch_size=4, scorers=[(scorer("latent-mean"), 1.0)], method_args={"beta": 500.0},
                                     training={"logging_steps": 10})  # fmt: skip
    before = trainer.sample_reward(seed=0, n=4)
    trainer.train()
    assert trainer.sample_reward(seed=0, n=4) > before + 0.05


def test_scorers_read_the_prompt_rows_data_columns(tmp_path):
    from trl_plus import Scorer

    class Target(Scorer):
        """Minus the distance of the latent mean from the row's ``target`` column."""

        name, inputs, columns = "target-test", "latents", ("target",)

        def score(self, prompts, completions, target):
            return -(completions.flatten(1).mean(1) - torch.tensor(target)).abs()

    rows = [{"prompt": f"prompt {i}", "target": float(i)} for i in range(2)]
    trainer = tiny_diffusion_trainer(OnlineDPO, tmp_path, lora=True, rows=rows, scorers=[(Target(), 1.0)],
                                     method_args={"beta": 500.0})  # fmt: skip
    seen, make_examples = [], trainer.method.make_examples
    trainer.method.make_examples = lambda rollouts: (seen.append(rollouts), make_examples(rollouts))[1]
    trainer.online_rows(list(trainer.train_dataset))
    rollouts = seen[0]
    assert rollouts.columns["target"] == [0.0] * 4 + [1.0] * 4  # each prompt's value, per image
    expected = -(rollouts.latents.flatten(1).mean(1).double() - torch.tensor(rollouts.columns["target"])).abs()
    assert torch.allclose(rollouts.scores[:, 0], expected, atol=1e-6)
    held_out = trainer.sample_reward(seed=0)  # the held-out (here: training) rows' columns reach the scorer too
    assert held_out < 0


def test_two_identical_runs_give_identical_curves_and_rollout_every_reuses_rows(tmp_path):
    histories, calls = [], []
    for run in range(2):
        trainer = online_trainer(tmp_path / f"r{run}", max_steps=4, training={"gradient_accumulation_steps": 1},
                                 rollout=Rollout(n=4, decoding={"steps": 4, "eta": 1.0}, every=2))  # fmt: skip
        original = trainer.method.rollout
        trainer.method.rollout = lambda t, ids, original=original: (calls.append(t.state.global_step), original(t, ids))[1]
        trainer.train()
        histories.append([(h.get("rollout/reward"), h["loss"]) for h in trainer.state.log_history if "loss" in h])
    assert histories[0] == histories[1] and len(histories[0]) == 4
    assert calls == [0, 2] * 2  # fresh samples at steps 0 and 2; steps 1 and 3 train on the same rows again


def test_chunked_backward_equals_one_forward(tmp_path):
    grads = []
    for size in (0, 1):  # transitions: no random draws in the loss, so the two gradients must agree
        trainer = online_trainer(tmp_path / str(size), method=Transitions, training={"examples_per_forward": size})
        with torch.no_grad():
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # LoRA away from zero: the policy differs from the reference
        trainer.model.train()
        batch = trainer.data_collator(list(trainer.train_dataset[:2]))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
        trainer.model.zero_grad()
        assert trainer._metrics["train"]["rollout/rows"][-1] == 6  # 2 prompts x 3 steps
    # float32 forwards of 6 rows vs 1 row reduce in different orders, and a step density's 1/σ² amplifies that
    # (measured: 3.3e-5 relative in norm); a lost or doubled chunk would differ by 1/6 or more
    assert (grads[0] - grads[1]).norm() <= 1e-3 * grads[0].norm()


def test_transitions_are_scored_as_the_recorded_step_densities(tmp_path):
    trainer = online_trainer(tmp_path, method=Transitions)
    rollouts = trainer.method.rollout(trainer, torch.tensor([1]))
    rows = trainer.method.make_examples(rollouts)
    batch = trainer._prepare_inputs(trainer.example_collator(rows))
    with torch.no_grad():
        score = trainer.transition_score(trainer.policy(), batch)
    recorded = rollouts.trajectory.logps.T.reshape(-1)  # [2 images, steps] -> image-major as the collated rows
    assert torch.allclose(score.logps.view(-1), recorded, atol=1e-5, rtol=0)
    assert torch.allclose(score.ref_logps, score.logps, atol=1e-6)  # LoRA at zero: the adapter-off reference is equal


def test_parameter_states_are_checkpointed_and_resumed(tmp_path):
    class Lagged(OnlineDPO):
        name = "lagged-test"

        def step_end(self, trainer):
            trainer.parameter_state("sampler").update(trainer.policy(), decay=0.5)

    trainer = online_trainer(tmp_path / "a", method=Lagged, training={"save_strategy": "steps", "save_steps": 2})
    trainer.train()
    saved = trainer.parameter_state("sampler").state_dict()
    resumed = online_trainer(tmp_path / "b", method=Lagged)
    resumed._load_from_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    restored = resumed.parameter_state("sampler").state_dict()
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)


def test_held_out_prompts_are_evaluated_on_fixed_seed_samples(tmp_path):
    trainer = online_trainer(tmp_path, eval_dataset=PROMPTS[:2])
    first = trainer.evaluate()["eval_rollout/reward"]
    assert first == trainer.evaluate()["eval_rollout/reward"] == trainer.sample_reward(seed=0)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoding, message", [
    ({"steps": 0}, "rollout.decoding.steps: the sampler's denoising steps must be a positive integer"),
    ({"stepz": 4}, "rollout.decoding.stepz: not a diffusion sampler setting"),
    ({"steps": 2000}, "2000 steps, but the scheduler has 1000 training timesteps"),
    ({"eta": -1.0}, "rollout.decoding.eta: expected a number >= 0"),
])  # fmt: skip
def test_sampler_settings_the_scheduler_rejects_are_one_line_errors(tmp_path, decoding, message):
    with pytest.raises(TrlPlusError, match=message.replace("(", r"\(")):
        online_trainer(tmp_path, rollout=Rollout(n=2, decoding=decoding))


def test_flow_ode_refuses_eta_and_transitions_refuse_a_deterministic_sampler(tmp_path):
    with pytest.raises(TrlPlusError, match="samples with the deterministic Euler ODE; set eta: 0"):
        tiny_diffusion_trainer(OnlineDPO, tmp_path, target="flow", rows=PROMPTS, scorers=[(scorer("latent-mean"), 1)])
    with pytest.raises(TrlPlusError, match="needs a DDPM-family scheduler and rollout.decoding.eta > 0"):
        online_trainer(tmp_path, method=Transitions, rollout=Rollout(n=2, decoding={"eta": 0.0}))


def test_scorers_must_read_images_and_an_online_method_needs_one(tmp_path):
    with pytest.raises(TrlPlusError, match="keyword scores text; a diffusion run's scorers read images"):
        tiny_diffusion_trainer(OnlineDPO, tmp_path, rows=PROMPTS,
                               scorers=[(scorer("keyword", keyword="red"), 1.0)])
    with pytest.raises(TrlPlusError, match="scores its own samples: give rollout.scorers"):
        online_trainer(tmp_path, scorers=())


def test_a_recipe_names_image_scorers_for_diffusion_methods_and_text_scorers_for_text_ones(tmp_path):
    from trl_plus.run.validate import build_rollout

    path = tiny_recipe(tmp_path, "grpo", [{"prompt": "p"}], rollout={"scorers": [{"name": "brightness"}]})
    recipe, method = load_recipe(path), get_registry().get("grpo")()
    with pytest.raises(TrlPlusError, match=r"rollout.scorers.0.name: brightness scores pixels, but method 'grpo' "
                                           r"samples text"):  # fmt: skip
        build_rollout(recipe, method)


def online_recipe(tmp_path, rollout, **training):
    import yaml

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "a shape {i}"}}\n' for i in range(4)))
    recipe = {"method": OnlineDPO.name, "method_args": {"beta": 500.0},
              "model": {"kind": "diffusion", "name_or_path": "tiny-sd", "resolution": 16,
                        "lora": {"r": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}},
              "data": {"train": {"path": str(data)}, "eval": {"path": str(data)}}, "rollout": rollout,
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2,
                           "learning_rate": 1e-3, "eval_steps": 2, "logging_steps": 1, **training}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_an_online_recipe_trains_through_the_vae_and_evaluates_sample_rewards(tmp_path):
    from trl_plus import train
    from trl_plus.testing import registered

    rollout = {"n": 2, "decoding": {"steps": 3}, "scorers": [{"name": "brightness"}]}
    with registered(OnlineDPO):
        result = train(online_recipe(tmp_path, rollout))
    import json
    import os

    logs = json.load(open(os.path.join(result.output_dir, "trainer_state.json")))["log_history"]
    assert any("rollout/reward" in h for h in logs) and any("eval_rollout/reward" in h for h in logs)
    assert all(0 <= h["rollout/reward"] <= 1 for h in logs if "rollout/reward" in h)  # brightness of decoded pixels


@pytest.mark.parametrize("rollout, message", [
    ({"scorers": []}, "rollout: method 'online-diffusion-dpo-test' ranks its own samples: add rollout"),
    ({"decoding": {"temperature": 0.9}, "scorers": [{"name": "brightness"}]},
     "rollout.decoding.temperature: not a diffusion sampler setting"),
    ({"sources": ["reference"], "scorers": [{"name": "brightness"}]},
     "rollout.sources: a diffusion method samples from its policy only"),
    ({"scorers": [{"name": "keyword", "args": {"keyword": "x"}}]}, "rollout.scorers.0.name: keyword scores text"),
])  # fmt: skip
def test_online_recipe_mistakes_are_one_line_errors(tmp_path, rollout, message):
    from trl_plus import check_recipe
    from trl_plus.testing import registered

    with registered(OnlineDPO), pytest.raises(TrlPlusError, match=message):
        check_recipe(load_recipe(online_recipe(tmp_path, rollout)))


# -- two processes ------------------------------------------------------------------------------------------------
TINY_SD = ["model.name_or_path=tiny-sd", "model.dtype=float32", "model.resolution=16", "training.disable_tqdm=true",
           "training.gradient_accumulation_steps=2", "training.max_steps=2", "training.bf16=false"]  # fmt: skip


@pytest.mark.parametrize("recipe, extra", [
    ("recipes/diffusion-dpo.yaml", ["data.train.path=recipes/data/diffusion_pairs.jsonl", "data.train.columns={}",
                                    "data.train.label=null", "training.per_device_train_batch_size=2"]),
    ("recipes/d3po.yaml", ["model.text_encoders.dtype=float32", "data.train.path=recipes/data/online_prompts.jsonl",
                           "rollout.decoding.steps=4", "training.examples_per_forward=4"]),
], ids=["offline", "online"])  # fmt: skip
def test_diffusion_runs_train_under_accelerate_launch(tmp_path, recipe, extra):
    """Two CPU processes (DDP over gloo): the denoiser reaches the loss wrapped, and an online run's chunked
    backward (several backward passes in one step) syncs as one; one summary, one output."""
    import json

    from trl_plus.testing import launch

    if "d3po" in recipe:
        pytest.importorskip("trl_plus_d3po")
    proc = launch("-m", "trl_plus", "train", recipe, "--set", f"training.output_dir={tmp_path}", *TINY_SD, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished after 2 steps") == 1
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (tmp_path / "pytorch_lora_weights.safetensors").exists()
    if "d3po" in recipe:
        assert any("rollout/reward" in entry for entry in state["log_history"])
