"""Samplers over DiffusionObjective.denoise against diffusers' scheduler loops (tiny UNet, CPU)."""

import math

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DConditionModel,
)
from jsonargparse import ArgumentParser

from lightning_sd.objectives import DiffusionObjective, DiscreteSchedule, Epsilon, VPrediction
from lightning_sd.sampling import (
    DPMPP2M,
    Euler,
    Heun,
    Sampler,
    guided_denoiser,
    karras_sigmas,
    sample,
)

SD15 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)
STEPS = 8
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions gain nothing from threads, and with a busy second core OpenMP barriers
    # made each tiny-UNet call ~100x slower (1.2 s instead of 9 ms) on the 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)


@pytest.fixture(scope="module")
def objective():
    return DiffusionObjective(
        Epsilon(), schedule=DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    )


def _net(unet, round_t=False):
    def model(x, t, encoder_hidden_states):
        return unet(
            x, t.round() if round_t else t, encoder_hidden_states=encoder_hidden_states
        ).sample

    return model


def _diffusers_loop(scheduler, unet, x, cond):
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(unet(x_in, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    return x


def _compare(name, ours, theirs):
    err = (ours - theirs).abs().max().item()
    print(f"{name}: max abs diff {err:.2e} (|x| max {theirs.abs().max():.2f}, tol {TOL:.0e})")
    assert torch.isfinite(ours).all()
    assert err <= TOL


def test_karras_sigmas_match_diffusers(objective):
    scheduler = EulerDiscreteScheduler(**SD15, use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    schedule = objective.schedule
    ours = karras_sigmas(schedule.sigma_min, schedule.sigma_max, STEPS)
    err = ((ours - scheduler.sigmas).abs() / scheduler.sigmas.clamp_min(1e-3)).max().item()
    print(f"karras_sigmas vs EulerDiscreteScheduler(use_karras_sigmas): max rel diff {err:.2e}")
    assert ours.shape == (STEPS + 1,) and ours[-1] == 0
    assert err <= 1e-6


@pytest.mark.parametrize(
    "grid",
    [dict(use_karras_sigmas=True), dict(timestep_spacing="leading", steps_offset=1)],
    ids=["karras", "sd15_leading"],
)
@torch.no_grad()
def test_euler_matches_euler_discrete_scheduler(unet, inputs, objective, grid):
    noise, cond = inputs
    scheduler = EulerDiscreteScheduler(**SD15, **grid)
    scheduler.set_timesteps(STEPS)
    theirs = _diffusers_loop(scheduler, unet, noise * scheduler.sigmas[0], cond)
    denoiser = lambda x, s: objective.denoise(_net(unet), x, s, encoder_hidden_states=cond)  # noqa: E731
    ours = Euler()(denoiser, noise * scheduler.sigmas[0], scheduler.sigmas)
    _compare(f"Euler vs EulerDiscreteScheduler ({grid})", ours, theirs)


@torch.no_grad()
def test_heun_matches_heun_discrete_scheduler(unet, inputs, objective):
    noise, cond = inputs
    scheduler = HeunDiscreteScheduler(**SD15, use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])  # undo the duplication
    assert sigmas.shape == (STEPS + 1,)
    theirs = _diffusers_loop(scheduler, unet, noise * sigmas[0], cond)
    denoiser = lambda x, s: objective.denoise(_net(unet), x, s, encoder_hidden_states=cond)  # noqa: E731
    ours = Heun()(denoiser, noise * sigmas[0], sigmas)
    _compare("Heun vs HeunDiscreteScheduler", ours, theirs)


@torch.no_grad()
def test_dpmpp_2m_matches_dpm_solver_multistep(unet, inputs, objective):
    noise, cond = inputs
    scheduler = DPMSolverMultistepScheduler(
        **SD15, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    scheduler.set_timesteps(STEPS)
    # DPMSolverMultistepScheduler works on VP-scaled x, x / sqrt(sigma^2 + 1) (its pipelines
    # start from unit noise, an approximation of this); at sigma = 0 both scalings agree.
    sigma_max = scheduler.sigmas[0]
    theirs = _diffusers_loop(scheduler, unet, noise * sigma_max / (sigma_max**2 + 1).sqrt(), cond)
    # diffusers rounds the karras timesteps it conditions on (not the sigmas); so do we here.
    net = _net(unet, round_t=True)
    denoiser = lambda x, s: objective.denoise(net, x, s, encoder_hidden_states=cond)  # noqa: E731
    ours = DPMPP2M()(denoiser, noise * scheduler.sigmas[0], scheduler.sigmas)
    _compare("DPM++ 2M vs DPMSolverMultistepScheduler", ours, theirs)


def _gaussian_ode_error(sampler, steps, s_data=0.5):
    # Data ~ N(0, s_data^2): the exact denoiser is linear, D = x s_data^2 / (s_data^2 + sigma^2),
    # and the ODE solution is x(sigma) = c sqrt(s_data^2 + sigma^2).
    sigmas = karras_sigmas(0.002, 80.0, steps).double()
    x_max = torch.full((1, 1), sigmas[0].item(), dtype=torch.float64)
    denoiser = lambda x, sigma: x * s_data**2 / (s_data**2 + sigma.view(-1, 1) ** 2)  # noqa: E731
    exact = sigmas[0].item() * s_data / math.sqrt(s_data**2 + sigmas[0].item() ** 2)
    return abs(sampler(denoiser, x_max, sigmas).item() / exact - 1)


@pytest.mark.parametrize("sampler, order", [(Euler(), 1), (Heun(), 2), (DPMPP2M(), 2)], ids=repr)
def test_samplers_converge_at_their_order(sampler, order):
    errors = [_gaussian_ode_error(sampler, n) for n in (16, 32, 64)]
    ratios = [b / a for a, b in zip(errors, errors[1:], strict=False)]
    print(f"{sampler}: Gaussian-ODE rel errors at 16/32/64 steps {errors}, ratios {ratios}")
    for r in ratios:  # halving the step divides the error by about 2^order
        assert 0.7 * 2.0**-order <= r <= 1.25 * 2.0**-order


def test_guidance_is_one_batched_call(inputs, objective):
    noise, cond = inputs
    uncond = torch.zeros(1, 5, 16)  # one shared negative prompt, broadcast to the batch
    calls = []

    def model(x, t, encoder_hidden_states):
        calls.append(x.shape[0])
        return torch.tanh(x) + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)

    sigma = torch.full((2,), 3.0)
    guided = guided_denoiser(
        objective, model, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 7.5
    )(noise, sigma)
    assert calls == [4]
    d_c = objective.denoise(model, noise, sigma, encoder_hidden_states=cond)
    d_u = objective.denoise(model, noise, sigma, encoder_hidden_states=uncond.expand(2, 5, 16))
    assert torch.allclose(guided, d_u + 7.5 * (d_c - d_u), atol=1e-5)

    calls.clear()
    out = sample(objective, model, noise, {"encoder_hidden_states": cond}, steps=4)
    assert calls == [2] * 4 and out.shape == noise.shape  # no guidance: no uncond pass


def test_sample_defaults_run_for_v_prediction(inputs):
    noise, cond = inputs
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15), zero_terminal_snr=True)
    objective = DiffusionObjective(VPrediction(), zero_terminal_snr=True, schedule=schedule)
    model = lambda x, t, encoder_hidden_states: torch.tanh(x)  # noqa: E731
    out = sample(
        objective,
        model,
        noise,
        {"encoder_hidden_states": cond},
        {"encoder_hidden_states": torch.zeros_like(cond)},
        guidance_scale=5.0,
        steps=6,
        sampler=Heun(),
    )
    assert out.shape == noise.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPMPP2M"])
def test_samplers_are_yaml_instantiable(name):
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    cfg = parser.parse_object({"sampler": {"class_path": f"lightning_sd.sampling.{name}"}})
    assert type(parser.instantiate(cfg).sampler).__name__ == name
