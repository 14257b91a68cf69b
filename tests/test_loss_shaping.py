"""Robust distances, timestep bias, debiased estimation and pyramid noise, each pinned to the
formula of its reference (kohya sd-scripts, the diffusers SDXL example), written out here."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lightning_sd.objectives import (
    DebiasedEstimation,
    DiffusionObjective,
    DiscreteSchedule,
    Epsilon,
    Huber,
    PyramidNoise,
    SmoothL1,
    TimestepBias,
    VPrediction,
)

SD15 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)
T = torch.tensor([0, 1, 10, 250, 500, 999])


@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(**SD15)


@pytest.fixture(scope="module")
def schedule(ddpm):
    return DiscreteSchedule.from_scheduler(ddpm)


# --- kohya's reference formulas (library/train_util.py, custom_train_functions.py) -----------


def kohya_threshold(schedule_name, huber_c, huber_scale, timesteps, ddpm):
    if schedule_name == "exponential":
        alpha = -math.log(huber_c) / ddpm.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if schedule_name == "snr":
        ac = torch.index_select(ddpm.alphas_cumprod, 0, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full((len(timesteps),), huber_c * huber_scale)


def kohya_conditional_loss(pred, target, loss_type, huber_c):
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


@pytest.mark.parametrize("kind", [Huber, SmoothL1], ids=lambda k: k.__name__)
@pytest.mark.parametrize("name", ["constant", "exponential", "snr"])
def test_pseudo_huber_matches_kohya_conditional_loss(kind, name, ddpm, schedule):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, len(T), 4, 3, 3, generator=g) * 2
    distance = kind(huber_c=0.2, schedule=name, huber_scale=1.5)
    ours = distance(pred, target, schedule.sigmas[T], schedule)
    c = kohya_threshold(name, 0.2, 1.5, T, ddpm)
    loss_type = "huber" if kind is Huber else "smooth_l1"
    reference = kohya_conditional_loss(pred, target, loss_type, c.float())
    assert (ours - reference).abs().max() <= 2e-6 * reference.abs().max()
    if name == "snr":  # 0.8 / 1.029^2 + 0.2 at t=0; near the floor c at t=999 (sigma 14.6)
        assert distance.threshold(schedule.sigmas[T], schedule)[0] == pytest.approx(
            0.9553, abs=1e-4
        )
        assert distance.threshold(schedule.sigmas[T], schedule)[-1] == pytest.approx(
            0.2033, abs=1e-4
        )


def test_huber_is_the_mse_for_small_errors_and_linear_for_large(schedule):
    sigma = schedule.sigmas[T[:1]]
    huber = Huber(huber_c=1.0, schedule="constant")
    small, large = torch.full((1, 1), 0.05), torch.full((1, 1), 1e3)
    zero = torch.zeros(1, 1)
    assert huber(small, zero, sigma, schedule).item() == pytest.approx(0.05**2, rel=1e-3)
    assert huber(large, zero, sigma, schedule).item() == pytest.approx(2 * 1e3 - 2, rel=1e-6)


def test_objective_loss_uses_the_distance_on_the_network_output(schedule):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, len(T), 4, 4, 4, generator=g)
    output = torch.randn(len(T), 4, 4, 4, generator=g)
    sigma = schedule.sigmas[T]
    objective = DiffusionObjective(VPrediction(), distance=SmoothL1(0.1, "snr"), schedule=schedule)
    loss = objective.loss(lambda x, t: output, x0, noise=noise, sigma=sigma)
    target = objective.target(x0, noise, sigma)
    c = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
    expected = kohya_conditional_loss(output, target, "smooth_l1", c).flatten(1).mean(1)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


def test_bad_huber_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="huber_c"):
        Huber(huber_c=0.0)
    with pytest.raises(ValueError, match="schedule"):
        SmoothL1(schedule="cosine")


# --- timestep bias: diffusers' generate_timestep_weights (SDXL text-to-image example) --------


def diffusers_timestep_weights(strategy, multiplier, portion, begin, end, num_timesteps):
    weights = torch.ones(num_timesteps)
    num_to_bias = int(portion * num_timesteps)
    if strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif strategy == "range":
        bias_indices = slice(begin, end)
    else:
        return weights
    weights[bias_indices] *= multiplier
    weights /= weights.sum()
    return weights


@pytest.mark.parametrize(
    "strategy, multiplier, portion, begin, end",
    [("earlier", 3.0, 0.25, 0, 1000), ("later", 2.0, 0.4, 0, 1000), ("range", 5.0, 0.0, 200, 500),
     ("later", 0.5, 0.3, 0, 1000)],
)  # fmt: skip
def test_timestep_bias_weights_and_draws_match_diffusers(
    strategy, multiplier, portion, begin, end, schedule
):
    bias = TimestepBias(strategy, multiplier, portion, begin, end)
    reference = diffusers_timestep_weights(strategy, multiplier, portion, begin, end, 1000)
    assert torch.allclose(bias.weights(1000), reference, rtol=1e-6, atol=0)
    sigma = bias(4096, schedule, generator=torch.Generator().manual_seed(3))
    t = torch.multinomial(reference, 4096, True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sigma, schedule.sigmas[t])
    # The biased share of draws follows the weights (earlier x3 on 25%: 0.5 of all draws).
    drawn = schedule.sigma_to_t(sigma).round().long()
    in_bias = (
        reference[drawn] > reference.min() if multiplier > 1 else reference[drawn] < reference.max()
    )
    expected = (
        float(reference[reference > reference.min()].sum())
        if multiplier > 1
        else float(reference[reference < reference.max()].sum())
    )
    assert abs(in_bias.float().mean().item() - expected) < 0.03


def test_timestep_bias_none_is_uniform_and_bad_values_are_named(schedule):
    assert torch.equal(TimestepBias().weights(1000), torch.full((1000,), 1e-3))
    with pytest.raises(ValueError, match="multiplier"):
        TimestepBias("later", multiplier=0.0)
    with pytest.raises(ValueError, match="range end 1000 exceeds"):
        TimestepBias("range", 2.0, begin=10, end=1000)(
            2, DiscreteSchedule(torch.linspace(0.1, 5, 10))
        )


# --- debiased estimation: kohya's apply_debiased_estimation, Yu et al. 2023 ----------------


def test_debiased_estimation_matches_kohya_for_epsilon(ddpm, schedule):
    t = torch.arange(1000)
    all_snr = ddpm.alphas_cumprod / (1.0 - ddpm.alphas_cumprod)  # kohya's all_snr
    snr_t = torch.minimum(all_snr[t], torch.ones_like(all_snr[t]) * 1000)
    reference = 1 / torch.sqrt(snr_t)
    sigma = schedule.sigmas[t]
    ours = DebiasedEstimation()(sigma, Epsilon()(sigma))
    assert (ours - reference).abs().max() <= 1e-5 * reference.max()
    assert all_snr[0] > 1000 and ours[0] == pytest.approx(1000**-0.5, rel=1e-5)  # the clamp


def test_debiased_estimation_for_v_is_the_paper_weight_not_kohyas(schedule):
    sigma = schedule.sigmas[torch.arange(1, 1000)]  # SNR < 1000: no clamp
    snr = sigma**-2
    ours = DebiasedEstimation()(sigma, VPrediction()(sigma))
    # The eps weight 1/sqrt(SNR) moved to the v error: ||eps err||^2 = SNR/(SNR+1) ||v err||^2.
    assert torch.allclose(ours, snr.sqrt() / (snr + 1), rtol=1e-5)
    assert not torch.allclose(ours, 1 / (snr + 1), rtol=1e-2)  # kohya's v form


# --- pyramid noise: kohya's pyramid_noise_like --------------------------------------------


def kohya_pyramid_noise_like(noise, iterations, discount, draw_r, draw_randn):
    """kohya's loop with its random sources passed in (random.random, torch.randn)."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = draw_r() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(draw_randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations, discount", [(6, 0.4), (10, 0.8), (1, 0.3)])
def test_pyramid_noise_matches_kohya(iterations, discount):
    base = torch.randn(3, 4, 24, 16, generator=torch.Generator().manual_seed(0))
    ours = PyramidNoise(iterations, discount)(base, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    reference = kohya_pyramid_noise_like(
        base.clone(), iterations, discount,
        lambda: float(torch.rand((), generator=g)),
        lambda *shape: torch.randn(shape, generator=g),
    )  # fmt: skip
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)
    assert ours.std().item() == pytest.approx(1.0, abs=1e-6)


def test_pyramid_noise_carries_low_frequencies():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(64, 4, 32, 32, generator=g)
    pyramid = PyramidNoise(6, 0.8)(white, g)
    # Variance of 8x8 block means: 1/64 for white noise, far larger with coarse levels.
    blocks = lambda n: F.avg_pool2d(n, 8).var().item()  # noqa: E731
    assert blocks(white) == pytest.approx(1 / 64, rel=0.2)
    assert blocks(pyramid) > 10 * blocks(white)


def test_objective_applies_pyramid_noise_when_drawing_noise(schedule):
    objective = DiffusionObjective(Epsilon(), pyramid_noise=PyramidNoise(6, 0.8), schedule=schedule)
    seen = {}

    def model(x, t):
        seen["x"] = x
        return torch.zeros_like(x)

    x0 = torch.zeros(8, 4, 16, 16)
    objective.loss(model, x0, sigma=torch.full((8,), 1e6), generator=torch.Generator())
    noise = seen["x"]  # c_in * (0 + sigma * eps) ~ eps at huge sigma
    assert F.avg_pool2d(noise, 8).var().item() > 5 / 64


def test_config_fragments_build_the_new_parts():
    from pathlib import Path

    import yaml
    from jsonargparse import ArgumentParser

    configs = Path(__file__).resolve().parents[1] / "configs" / "objective"
    parser = ArgumentParser()
    parser.add_argument("--objective", type=DiffusionObjective)

    def build(name):
        node = yaml.safe_load((configs / f"{name}.yaml").read_text())["model"]["objective"]
        return parser.instantiate(parser.parse_object({"objective": node})).objective

    huber = build("eps_huber").distance
    assert type(huber) is Huber and (huber.huber_c, huber.schedule) == (0.1, "snr")
    pyramid = build("eps_pyramid_noise").pyramid_noise
    assert (pyramid.iterations, pyramid.discount) == (6, 0.3)
    bias = build("eps_timestep_bias").sigma_sampler
    assert (bias.strategy, bias.multiplier, bias.portion) == ("later", 2.0, 0.25)
