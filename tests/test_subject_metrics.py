"""The DreamBooth measures on features: exact values on hand-made vectors."""

import pytest
import torch

from lightning_sd.metrics.subject import prior_drift, retrieval_accuracy, subject_fidelity


def test_retrieval_accuracy_counts_ranks():
    real = torch.eye(4)
    # Sample 0 and 1 find their image first; sample 2 ranks its image second; 3 ranks it last.
    generated = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0.9, 0.5, 0], [1.0, 1.0, 1.0, 0]])
    acc = retrieval_accuracy(generated, real, ks=(1, 2, 4))
    assert acc == {1: 0.5, 2: 0.75, 4: 1.0}


def test_fidelity_and_drift_are_mean_cosines():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    b = torch.tensor([[1.0, 0.0]])
    assert subject_fidelity(a, b) == pytest.approx((1 + 2**-0.5) / 2)
    assert prior_drift(a, a) == pytest.approx(0.0, abs=1e-7)
    assert prior_drift(a, torch.flip(a, [0])) == pytest.approx(1 - 2**-0.5)
