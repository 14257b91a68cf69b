"""Objectives pinned against diffusers' reference maths (SD1.5 schedule, CPU, tiny tensors)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, EDMEulerScheduler
from diffusers.training_utils import compute_snr
from jsonargparse import ArgumentParser

from lightning_sd.objectives import (
    EDM,
    Canonical,
    DebiasedEstimation,
    DiffusionObjective,
    DiscreteLogitNormal,
    DiscreteSchedule,
    DiscreteUniform,
    EDMWeighting,
    Epsilon,
    FlowMatching,
    FlowTimesteps,
    LogNormal,
    MinSNR,
    Sample,
    SD3Weighting,
    TimestepBias,
    VPrediction,
)

SD15 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "objective"
ALL_T = torch.arange(1000)


@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(**SD15)


@pytest.fixture(scope="module")
def schedule(ddpm):
    return DiscreteSchedule.from_scheduler(ddpm)


def _data(n=1000, shape=(4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)


def _capture():
    """A model returning zeros and recording what it was given."""
    seen = {}

    def model(x, t, **cond):
        seen.update(x=x, t=t, **cond)
        return torch.zeros_like(x)

    return model, seen


def _report(name, err, tol):
    print(f"{name}: max err {err:.2e} (tol {tol:.0e})")
    assert err <= tol


# --- parameterizations vs diffusers over the whole timestep range ---------------------------


def test_epsilon_target_is_the_noise_and_input_is_add_noise(ddpm, schedule):
    x0, noise = _data()
    objective = DiffusionObjective(Epsilon(), schedule=schedule)
    sigma = schedule.sigmas[ALL_T]
    _report("eps target - noise", (objective.target(x0, noise, sigma) - noise).abs().max(), 1e-6)
    model, seen = _capture()
    objective.loss(model, x0, noise=noise, sigma=sigma)
    reference = ddpm.add_noise(x0, noise, ALL_T)
    _report("c_in x - DDPMScheduler.add_noise", (seen["x"] - reference).abs().max(), 2e-6)
    assert torch.equal(seen["t"], ALL_T.float())  # table sigmas condition on integer timesteps


def test_v_target_is_get_velocity(ddpm, schedule):
    x0, noise = _data()
    objective = DiffusionObjective(VPrediction(), schedule=schedule)
    target = objective.target(x0, noise, schedule.sigmas[ALL_T])
    reference = ddpm.get_velocity(x0, noise, ALL_T)
    _report("v target - DDPMScheduler.get_velocity", (target - reference).abs().max(), 2e-6)
    model, seen = _capture()
    objective.loss(model, x0, noise=noise, sigma=schedule.sigmas[ALL_T])
    _report("v input - add_noise", (seen["x"] - ddpm.add_noise(x0, noise, ALL_T)).abs().max(), 2e-6)


def test_sample_target_is_x0(schedule):
    x0, noise = _data()
    target = DiffusionObjective(Sample(), schedule=schedule).target(
        x0, noise, schedule.sigmas[ALL_T]
    )
    _report("sample target - x0", (target - x0).abs().max(), 0.0)


@pytest.mark.parametrize("param", [Epsilon(), VPrediction(), Sample(), EDM(0.5)], ids=repr)
def test_denoise_recovers_x0_from_the_exact_target(schedule, param):
    x0, noise = _data(n=64)
    sigma = schedule.sigmas[torch.linspace(0, 999, 64).long()]
    objective = DiffusionObjective(param, schedule=schedule)
    target = objective.target(x0, noise, sigma)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    oracle = lambda x_in, t: target  # noqa: E731
    _report(f"{param} D(x) - x0", (objective.denoise(oracle, x, sigma) - x0).abs().max(), 5e-6)
    assert objective.loss(oracle, x0, noise=noise, sigma=sigma).abs().max() <= 1e-10


def test_v_prediction_is_edm_with_unit_sigma_data_and_flipped_output():
    sigma = torch.logspace(-2, 2, 50)
    v, edm = VPrediction()(sigma), EDM(sigma_data=1.0)(sigma)
    assert torch.allclose(v.c_skip, edm.c_skip) and torch.allclose(v.c_in, edm.c_in)
    assert torch.allclose(v.c_out, -edm.c_out)


def test_edm_scalings_match_edm_euler_scheduler():
    scheduler = EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon")
    g = torch.Generator().manual_seed(1)
    sigma = scheduler.sigmas[:-1][torch.randint(0, 1001, (16,), generator=g)]
    sample, model_output = torch.randn(2, 16, 4, 3, 3, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    c = EDM(sigma_data=0.5)(sigma)
    c_skip, c_out, c_in = (v.view(-1, 1, 1, 1) for v in c)
    err_in = (c_in * sample - scheduler.precondition_inputs(sample, s)).abs().max()
    denoised = scheduler.precondition_outputs(sample, model_output, s)
    err_out = (c_skip * sample + c_out * model_output - denoised).abs().max() / denoised.abs().max()
    _report("EDM c_in vs precondition_inputs", err_in, 1e-6)
    _report("EDM c_skip/c_out vs precondition_outputs (rel)", err_out, 1e-6)

    # The whole denoiser on an EDM-native schedule equals the scheduler's preconditioning chain.
    objective = DiffusionObjective(EDM(0.5), schedule=DiscreteSchedule.from_scheduler(scheduler))
    model = lambda x, t: torch.tanh(x) * (1 + t.view(-1, 1, 1, 1))  # noqa: E731
    ours = objective.denoise(model, sample, sigma)
    c_noise = scheduler.precondition_noise(sigma)
    theirs = scheduler.precondition_outputs(
        sample, model(scheduler.precondition_inputs(sample, s), c_noise), s
    )
    _report(
        "EDM denoise vs EDMEulerScheduler chain (rel)",
        (ours - theirs).abs().max() / theirs.abs().max(),
        1e-6,
    )


# --- weightings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "param, reference",
    [
        (Epsilon(), lambda snr: snr.clamp(max=5.0) / snr),
        (VPrediction(), lambda snr: snr.clamp(max=5.0) / (snr + 1)),
    ],
    ids=["epsilon", "v"],
)
def test_min_snr_matches_compute_snr(ddpm, schedule, param, reference):
    sigma = schedule.sigmas[ALL_T]
    ours = MinSNR(gamma=5.0)(sigma, param(sigma))
    theirs = reference(compute_snr(ddpm, ALL_T))
    _report(
        f"MinSNR {param} vs compute_snr formula (rel)", ((ours - theirs) / theirs).abs().max(), 1e-5
    )


def test_canonical_and_edm_weightings():
    sigma = torch.logspace(-3, 2, 40)
    assert torch.equal(Canonical()(sigma, Epsilon()(sigma)), torch.ones(40))
    w = EDMWeighting(0.5)(sigma, EDM(0.5)(sigma))  # Karras et al.: unit weight on F
    _report("EDMWeighting x EDM c_out^2 - 1", (w - 1).abs().max(), 1e-5)
    w_eps = EDMWeighting(0.5)(sigma, Epsilon()(sigma))
    assert torch.allclose(w_eps, (sigma**2 + 0.25) / 0.25)


@pytest.mark.parametrize("param", [Epsilon(), VPrediction()], ids=repr)
def test_zero_terminal_snr_is_finite_at_the_last_step(param):
    scheduler = DDPMScheduler(**SD15)
    objective = DiffusionObjective(
        param, DiscreteUniform(min_timestep=990), MinSNR(5.0), zero_terminal_snr=True
    )
    objective.set_schedule(scheduler)
    schedule = objective.schedule
    sigma = schedule.sigmas[[999, 998, 0]]
    weights = objective.weighting(sigma, param(sigma))
    x0, noise = _data(n=3)
    loss = objective.loss(lambda x, t: torch.tanh(x), x0, noise=noise, sigma=sigma)
    drawn = objective.loss(
        lambda x, t: torch.tanh(x), x0, generator=torch.Generator().manual_seed(0)
    )
    print(f"zero-terminal {param}: weights {weights.tolist()}, loss {loss.tolist()}")
    assert torch.isfinite(weights).all() and torch.isfinite(loss).all()
    assert torch.isfinite(drawn).all()
    # The naive epsilon form min(snr, g) / snr is 0/0 at the last step; ours takes its limit, 1.
    expected_last = 1.0 if isinstance(param, Epsilon) else 1.0 / (2.0**24)
    assert weights[0].item() == pytest.approx(expected_last, rel=1e-4)


# --- the loss against a hand-written diffusers-style reference ------------------------------


def _toy_model():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in conv.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def model(x, t, encoder_hidden_states):
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(conv(x)) * (1 + t.float() / 1000).view(-1, 1, 1, 1) + bias

    return model


@pytest.mark.parametrize("param", [Epsilon(), VPrediction()], ids=repr)
def test_loss_matches_diffusers_min_snr_reference(ddpm, schedule, param):
    model = _toy_model()
    x0, noise = _data(n=6, shape=(4, 8, 8), seed=2)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    cond = torch.randn(6, 7, 16, generator=torch.Generator().manual_seed(4))
    objective = DiffusionObjective(param, weighting=MinSNR(5.0), schedule=schedule)
    ours = objective.loss(
        model, x0, noise=noise, sigma=schedule.sigmas[t], encoder_hidden_states=cond
    )

    # diffusers train_text_to_image(_lora).py with --snr_gamma 5 (after PR #6307), per sample.
    model_pred = model(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=cond)
    snr = compute_snr(ddpm, t)
    if isinstance(param, Epsilon):
        target, weight = noise, snr.clamp(max=5.0) / snr
    else:
        target, weight = ddpm.get_velocity(x0, noise, t), snr.clamp(max=5.0) / (snr + 1)
    mse = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    theirs = mse * weight
    _report(
        f"loss {param} vs diffusers reference (rel)", ((ours - theirs) / theirs).abs().max(), 1e-5
    )


def test_noise_offset_and_input_perturbation():
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    objective = DiffusionObjective(noise_offset=0.1, input_perturbation=0.2, schedule=schedule)
    x0, _ = _data(n=4, shape=(4, 8, 8))
    model, seen = _capture()
    loss = objective.loss(model, x0, generator=torch.Generator().manual_seed(0))

    # Same draws in the same order: timesteps, noise, offset, perturbation.
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g) + 0.1 * torch.randn(4, 4, 1, 1, generator=g)
    perturbed = eps + 0.2 * torch.randn(x0.shape, generator=g)
    sigma = schedule.sigmas[t].view(-1, 1, 1, 1)
    x_in = (x0 + sigma * perturbed) / (sigma**2 + 1).sqrt()
    assert torch.equal(seen["t"], t.float())
    _report("perturbed network input", (seen["x"] - x_in).abs().max(), 1e-5)
    # A zero prediction's epsilon loss is the mean square of the *unperturbed* (offset) noise.
    _report(
        "loss uses the unperturbed noise", (loss - eps.pow(2).mean((1, 2, 3))).abs().max(), 1e-5
    )


def test_loss_is_reproducible_with_a_generator(schedule):
    objective = DiffusionObjective(VPrediction(), LogNormal(), schedule=schedule)
    x0, _ = _data(n=3)
    model = lambda x, t: torch.tanh(x)  # noqa: E731
    a = objective.loss(model, x0, generator=torch.Generator().manual_seed(7))
    b = objective.loss(model, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3,)


def test_denoise_accepts_a_scalar_sigma(schedule):
    objective = DiffusionObjective(VPrediction(), schedule=schedule)
    x, _ = _data(n=2)
    model = lambda x, t: torch.tanh(x) * t.view(-1, 1, 1, 1) / 1000  # noqa: E731
    assert torch.equal(
        objective.denoise(model, x, 2.5), objective.denoise(model, x, torch.full((2,), 2.5))
    )


# --- sigma samplers -------------------------------------------------------------------------


def test_discrete_uniform_range(schedule):
    sigma = DiscreteUniform(100, 200)(4096, schedule, generator=torch.Generator().manual_seed(0))
    t = schedule.sigma_to_t(sigma)
    assert torch.equal(t, t.round())
    assert t.min() == 100 and t.max() == 199
    with pytest.raises(ValueError):
        DiscreteUniform(0, 2000)(1, schedule)


def test_discrete_logit_normal_bias(schedule):
    def mean_t(loc):
        sampler = DiscreteLogitNormal(loc=loc, scale=1.0)
        sigma = sampler(4096, schedule, generator=torch.Generator().manual_seed(0))
        t = schedule.sigma_to_t(sigma)
        assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.round())
        return t.mean().item()

    low, mid, high = mean_t(-1.0), mean_t(0.0), mean_t(1.0)
    print(f"logit-normal mean timestep for loc -1/0/1: {low:.0f} {mid:.0f} {high:.0f}")
    assert low < 400 < mid < 600 < high


def test_log_normal(schedule):
    sigma = LogNormal(-1.2, 1.2)(4096, schedule, generator=torch.Generator().manual_seed(0))
    assert sigma.min() >= schedule.sigma_min and sigma.max() <= schedule.sigma_max
    assert sigma.log().median().item() == pytest.approx(-1.2, abs=0.1)


# --- construction ---------------------------------------------------------------------------


def test_defaults_and_schedule_checks(schedule):
    objective = DiffusionObjective()
    assert isinstance(objective.parameterization, Epsilon)
    assert isinstance(objective.sigma_sampler, DiscreteUniform)
    assert isinstance(objective.weighting, Canonical)
    with pytest.raises(RuntimeError, match="set_schedule"):
        objective.loss(lambda x, t: x, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DiffusionObjective(zero_terminal_snr=True, schedule=schedule)
    assert objective.state_dict() == {}


def test_edm_native_base_warns_without_edm_preconditioning():
    with pytest.warns(UserWarning, match="EDM-native"):
        DiffusionObjective(Epsilon()).set_schedule(EDMEulerScheduler())
    DiffusionObjective(EDM(0.5)).set_schedule(EDMEulerScheduler())  # no warning


EXPECTED = {
    "eps": (Epsilon, DiscreteUniform, Canonical),
    "v": (VPrediction, DiscreteUniform, Canonical),
    "sample": (Sample, DiscreteUniform, Canonical),
    "edm": (EDM, LogNormal, EDMWeighting),
    "eps_min_snr": (Epsilon, DiscreteUniform, MinSNR),
    "v_min_snr": (VPrediction, DiscreteUniform, MinSNR),
    "edm_min_snr": (EDM, LogNormal, MinSNR),
    "flow_sd3": (FlowMatching, FlowTimesteps, SD3Weighting),
    "eps_huber": (Epsilon, DiscreteUniform, Canonical),  # + Huber distance
    "eps_debiased": (Epsilon, DiscreteUniform, DebiasedEstimation),
    "eps_timestep_bias": (Epsilon, TimestepBias, Canonical),
    "eps_pyramid_noise": (Epsilon, DiscreteUniform, Canonical),  # + PyramidNoise
}


def test_every_objective_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_objective_config_instantiates(name):
    node = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["objective"]
    parser = ArgumentParser()
    parser.add_argument("--objective", type=DiffusionObjective)
    objective = parser.instantiate(parser.parse_object({"objective": node})).objective
    assert isinstance(objective, DiffusionObjective)
    parts = (objective.parameterization, objective.sigma_sampler, objective.weighting)
    for part, cls in zip(parts, EXPECTED[name], strict=True):
        assert type(part) is cls, (name, part)
