"""Rectified flow (SD3) in the VE identity, pinned to diffusers' SD3 training code to 1e-6.

References: ``FlowMatchEulerDiscreteScheduler``, ``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``, and the noisy input / target / loss of diffusers'
``train_dreambooth_lora_sd3.py`` (written out below as that script computes them).
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from lightning_sd.objectives import (
    DiffusionObjective,
    FlowMatching,
    FlowSchedule,
    FlowTimesteps,
    MinSNR,
    SD3Weighting,
)
from lightning_sd.objectives.flow import flow_s
from lightning_sd.objectives.schedule import DiscreteSchedule

B = 64


@pytest.fixture(scope="module")
def scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.fixture(scope="module")
def schedule(scheduler):
    schedule = DiscreteSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, FlowSchedule)
    return schedule


def script_draw(scheduler, scheme, seed, mode_scale=1.29):
    """The SD3 script's timestep draw: u, its indices, the scheduler's sigmas and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    u = compute_density_for_timestep_sampling(scheme, B, 0.0, 1.0, mode_scale, generator=gen)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=999)
    return scheduler.sigmas[indices], scheduler.timesteps[indices]


def test_schedule_is_the_scheduler_grid_with_its_shift(scheduler, schedule):
    s = flow_s(schedule.sigmas).float()
    assert torch.allclose(s, scheduler.sigmas.flip(0), atol=1e-6, rtol=0)
    t = schedule.sigma_to_t(schedule.sigmas)
    assert torch.allclose(t, scheduler.timesteps.flip(0), rtol=1e-6, atol=0)
    assert float(s[-1]) == pytest.approx(1.0, abs=1e-7)  # the capped pure-noise end
    shifted = 3.0 * 0.5 / (1 + 2.0 * 0.5)  # s = 0.5 before the shift
    assert float(schedule.t_to_sigma(torch.tensor(1000 * shifted))) == pytest.approx(
        shifted / (1 - shifted), rel=1e-6
    )


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_draws_match_the_sd3_script(scheduler, schedule, scheme):
    script_sigmas, script_t = script_draw(scheduler, scheme, seed=3)
    sigma = FlowTimesteps(scheme)(B, schedule, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(flow_s(sigma).float(), script_sigmas, atol=1e-6, rtol=0)
    assert torch.allclose(schedule.sigma_to_t(sigma), script_t, rtol=1e-6, atol=0)


def test_mode_density_reaching_u_1_is_clamped_to_the_grid(schedule, monkeypatch):
    sampler = FlowTimesteps("mode")
    monkeypatch.setattr(sampler, "draw_u", lambda *a, **k: torch.tensor([0.0, 1.0]))
    sigma = sampler(2, schedule)
    assert torch.equal(sigma, torch.stack([schedule.sigmas[-1], schedule.sigmas[0]]))


def test_cosmap_density_is_the_papers_formula(schedule):
    x = torch.rand(B, generator=torch.Generator().manual_seed(5))
    expected = 1.0 - 1.0 / (torch.tan(math.pi * x / 2) + 1.0)
    u = FlowTimesteps("cosmap").draw_u(B, torch.Generator().manual_seed(5))
    assert torch.allclose(u, expected, atol=1e-7)


def make_objective(schedule, weighting=None):
    return DiffusionObjective(FlowMatching(), FlowTimesteps(), weighting, schedule=schedule)


def test_noisy_input_timestep_and_target_match_the_sd3_script(scheduler, schedule):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(B, 16, 4, 4, generator=gen), torch.randn(B, 16, 4, 4, generator=gen)
    script_sigmas, script_t = script_draw(scheduler, "logit_normal", seed=7)
    s = script_sigmas.view(B, 1, 1, 1)
    script_input = (1.0 - s) * x0 + s * noise
    script_target = noise - x0

    seen = {}

    def model(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    objective = make_objective(schedule)
    sigma = FlowTimesteps()(B, schedule, generator=torch.Generator().manual_seed(7))
    objective.loss(model, x0, noise=noise, sigma=sigma)
    assert torch.allclose(seen["x_in"], script_input, atol=1e-6, rtol=0)
    assert torch.allclose(seen["t"], script_t, rtol=1e-6, atol=0)
    target = objective.target(x0, noise, sigma)
    assert torch.allclose(target, script_target, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_weighted_loss_matches_the_sd3_scripts_preconditioned_loss(scheduler, schedule, scheme):
    """The script (precondition_outputs=1) weights the x0 error; ours the velocity error times
    lambda c_out^2: the same number per sample."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(B, 16, 4, 4, generator=gen), torch.randn(B, 16, 4, 4, generator=gen)
    velocity = torch.randn(B, 16, 4, 4, generator=gen)  # what the network "predicts"
    script_sigmas, _ = script_draw(scheduler, "logit_normal", seed=2)
    s = script_sigmas.view(B, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    x0_pred = velocity * (-s) + noisy
    weighting = compute_loss_weighting_for_sd3(scheme, s)
    script_loss = (weighting.float() * (x0_pred - x0) ** 2).reshape(B, -1).mean(1)

    objective = make_objective(schedule, SD3Weighting(scheme))
    sigma = FlowTimesteps()(B, schedule, generator=torch.Generator().manual_seed(2))
    ours = objective.loss(lambda x, t: velocity, x0, noise=noise, sigma=sigma)
    assert torch.allclose(ours, script_loss, rtol=1e-5, atol=1e-6)


def test_min_snr_keeps_its_meaning_under_flow_matching():
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 50.0])
    weight = MinSNR(5.0)(sigma, FlowMatching()(sigma))
    snr = sigma**-2
    assert torch.allclose(weight, snr.clamp(max=5.0) * (sigma / (1 + sigma)) ** 2)
    # where SNR < gamma, the x0-space lambda is the SNR: (1 - s)^2 on the velocity error
    s = sigma / (1 + sigma)
    assert torch.allclose(weight[2:], (1 - s[2:]) ** 2)


def test_flow_parameterization_on_a_ddpm_schedule_warns():
    from diffusers import DDPMScheduler

    with pytest.warns(UserWarning, match="rectified-flow models"):
        DiffusionObjective(FlowMatching()).set_schedule(DDPMScheduler())


def test_euler_over_the_flow_grid_matches_flow_match_euler_sampling(scheduler, schedule):
    """The package's VE Euler sampler on a tiny SD3 transformer gives the latents diffusers'
    FlowMatchEulerDiscreteScheduler loop gives (the two Euler steps are the same step; the
    grid starts at s = 1, capped at 1 - 2^-24 here). Tolerance: 1e-5 absolute."""
    from diffusers import SD3Transformer2DModel

    from lightning_sd.sampling import Euler, sample

    torch.manual_seed(0)
    net = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16,
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    text, pooled = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 16, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)

    def model(x, t):
        kwargs = dict(encoder_hidden_states=text, pooled_projections=pooled)
        return net(hidden_states=x, timestep=t.expand(len(x)), **kwargs).sample

    steps = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    steps.set_timesteps(8)
    with torch.no_grad():
        latents = noise.clone()
        for t in steps.timesteps:
            latents = steps.step(model(latents, t), t, latents).prev_sample
        s = steps.sigmas.double().clamp(max=1 - 2.0**-24)
        objective = DiffusionObjective(FlowMatching(), schedule=schedule)
        ours = sample(objective, model, noise, {}, sigmas=(s / (1 - s)).float(), sampler=Euler())
    assert latents.abs().max() > 0.1
    assert torch.allclose(ours, latents, atol=1e-5, rtol=0), (ours - latents).abs().max()
