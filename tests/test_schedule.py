"""DiscreteSchedule against diffusers' schedulers (SD1.5's schedule, CPU, no downloads)."""

import math

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
)

from lightning_sd.objectives import DiscreteSchedule, EDMSchedule

SD15 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)


def test_sigmas_match_euler_discrete_scheduler():
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    euler = EulerDiscreteScheduler(**SD15)
    reference = euler.sigmas[:-1].flip(0)  # descending, with a trailing 0
    err = (schedule.sigmas - reference).abs().max().item()
    print(f"sigma table vs EulerDiscreteScheduler: max abs err {err:.2e}")
    assert schedule.num_timesteps == 1000
    assert err <= 1e-6
    assert schedule.sigma_min == pytest.approx(reference[0].item(), rel=1e-6)
    assert schedule.sigma_max == pytest.approx(reference[-1].item(), rel=1e-6)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_scheduler_used_for_inference_gives_the_training_table():
    euler = EulerDiscreteScheduler(**SD15)
    euler.set_timesteps(7)
    schedule = DiscreteSchedule.from_scheduler(euler)
    reference = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    assert torch.equal(schedule.sigmas, reference.sigmas)


def test_sigma_to_t_round_trips():
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), t)  # table entries map exactly
    assert torch.equal(schedule.t_to_sigma(t), schedule.sigmas)
    fractional = torch.linspace(0, 999, 4001)
    err = (schedule.sigma_to_t(schedule.t_to_sigma(fractional)) - fractional).abs().max().item()
    print(f"sigma_to_t(t_to_sigma(t)) fractional t: max abs err {err:.2e} timesteps")
    assert err <= 2e-4
    # Out-of-range sigmas clamp to the table's ends.
    assert schedule.sigma_to_t(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]


def test_sigma_to_t_matches_diffusers_interpolation():
    euler = EulerDiscreteScheduler(**SD15, use_karras_sigmas=True)
    euler.set_timesteps(12)
    schedule = DiscreteSchedule.from_scheduler(euler)
    err = (schedule.sigma_to_t(euler.sigmas[:-1]) - euler.timesteps).abs().max().item()
    print(f"sigma_to_t vs EulerDiscreteScheduler karras timesteps: max abs err {err:.2e}")
    assert err <= 1e-3


def test_buffers_follow_module_but_stay_out_of_state_dict():
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15))
    assert schedule.state_dict() == {}
    assert {name for name, _ in schedule.named_buffers()} == {"sigmas", "log_sigmas"}
    table = schedule.sigmas.clone()
    parent = torch.nn.Sequential(schedule).half()  # e.g. a module cast to half by its owner
    assert parent[0].sigmas.dtype == torch.float32 and torch.equal(parent[0].sigmas, table)
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(parent[0].sigma_to_t(table), t)


@pytest.mark.parametrize("ours", [True, False], ids=["our_rescale", "scheduler_config"])
def test_zero_terminal_snr(ours):
    if ours:
        schedule = DiscreteSchedule.from_scheduler(DDPMScheduler(**SD15), zero_terminal_snr=True)
    else:
        scheduler = DDPMScheduler(**SD15, rescale_betas_zero_snr=True)
        schedule = DiscreteSchedule.from_scheduler(scheduler)
    reference = EulerDiscreteScheduler(**SD15, rescale_betas_zero_snr=True).sigmas[:-1].flip(0)
    rel = ((schedule.sigmas - reference).abs() / reference).max().item()
    print(f"zero-terminal-SNR sigmas vs EulerDiscreteScheduler: max rel err {rel:.2e}")
    assert schedule.zero_terminal_snr
    assert rel <= 1e-5
    assert torch.isfinite(schedule.sigmas).all()
    assert schedule.sigma_max == pytest.approx(math.sqrt(2.0**24 - 1), rel=1e-5)
    assert schedule.sigma_to_t(schedule.sigmas[-1:]).item() == 999.0


def test_edm_schedule_uses_the_scheduler_grid_and_c_noise():
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    schedule = DiscreteSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, EDMSchedule)
    assert torch.equal(schedule.sigmas, scheduler.sigmas[:-1].flip(0))
    assert schedule.sigma_min == pytest.approx(0.002) and schedule.sigma_max == pytest.approx(80.0)
    sigma = torch.tensor([0.002, 0.1, 1.0, 14.6, 80.0])
    err = (schedule.sigma_to_t(sigma) - scheduler.precondition_noise(sigma)).abs().max().item()
    print(f"EDM c_noise vs EDMEulerScheduler.precondition_noise: max abs err {err:.2e}")
    assert err <= 1e-7
    assert torch.allclose(schedule.t_to_sigma(schedule.sigma_to_t(sigma)), sigma, rtol=1e-6)


def test_edm_dpm_solver_schedule_is_edm_native():
    scheduler = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0)
    schedule = DiscreteSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, EDMSchedule)
    assert schedule.num_timesteps == 1000
    assert schedule.sigma_max == pytest.approx(80.0)


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="EDM"):
        DiscreteSchedule.from_scheduler(EDMEulerScheduler(), zero_terminal_snr=True)
    with pytest.raises(ValueError, match="ascending"):
        DiscreteSchedule(torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        DiscreteSchedule(torch.tensor([1.0, float("inf")]))
