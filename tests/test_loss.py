"""compute_preference_loss against hand computations and direct double loops (method.md, "Losses" and "Weights")."""

import math

import pytest
import torch

import train_diffusion_rpo as rpo


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_losses(num_pairs, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = 0.1 + 0.01 * torch.rand(2 * num_pairs, generator=g, dtype=torch.float64)
    ref = model + 1e-4 * torch.randn(2 * num_pairs, generator=g, dtype=torch.float64)
    embeddings = torch.randn(2 * num_pairs, 8, generator=g, dtype=torch.float64)
    return model, ref, embeddings


def test_dpo_matches_hand_computed_value():
    # Two pairs: model/ref losses chosen so the logits are easy to write down.
    model = torch.tensor([0.10, 0.20, 0.30, 0.10], dtype=torch.float64)  # w1, w2, l1, l2
    ref = torch.tensor([0.11, 0.18, 0.30, 0.12], dtype=torch.float64)
    beta = 1000.0
    # pair 1: dw = -0.01, dl = 0.00 -> z = 0.01; pair 2: dw = 0.02, dl = -0.02 -> z = -0.04
    expected = -(logsigmoid(0.5 * beta * 0.01) + logsigmoid(0.5 * beta * -0.04)) / 2
    loss, metrics = rpo.compute_preference_loss(model, ref, loss_type="dpo", beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["model_mse_w"].item() == pytest.approx(0.15)
    assert metrics["model_mse_l"].item() == pytest.approx(0.20)
    assert metrics["ref_mse_w"].item() == pytest.approx(0.145)
    assert metrics["ref_mse_l"].item() == pytest.approx(0.21)
    assert "weight_diag_mean" not in metrics


def direct_rpo(model, ref, beta, weights):
    m = model.shape[0] // 2
    delta = [(model[i] - ref[i]).item() for i in range(2 * m)]
    total = 0.0
    for i in range(m):
        for j in range(m):
            z = -(delta[i] - delta[m + j])
            total += -logsigmoid(weights[i][j] * 0.5 * beta * z)
    return total / (m * m)


def direct_similarity_weights(embeddings, temperature, scale):
    m = embeddings.shape[0] // 2
    unit = [e / e.norm() for e in embeddings]
    weights = []
    for i in range(m):
        exps = [math.exp(-(1 - float(unit[i] @ unit[m + j])) / temperature) for j in range(m)]
        weights.append([scale * x / sum(exps) for x in exps])
    return weights


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_rpo_uniform_matches_double_loop(scale):
    model, ref, _ = random_losses(4)
    loss, metrics = rpo.compute_preference_loss(
        model, ref, loss_type="rpo", beta=5000.0, weighting="uniform", weight_scale=scale
    )
    assert loss.item() == pytest.approx(direct_rpo(model, ref, 5000.0, [[scale] * 4] * 4), rel=1e-9)
    assert metrics["weight_diag_mean"].item() == pytest.approx(scale)
    assert metrics["beta_effective_diag"].item() == pytest.approx(2500.0 * scale)


@pytest.mark.parametrize("temperature,scale", [(0.5, 1.0), (0.1, 1.0), (0.5, 3.0)])
def test_rpo_similarity_matches_double_loop(temperature, scale):
    model, ref, embeddings = random_losses(3, seed=1)
    weights = direct_similarity_weights(embeddings, temperature, scale)
    loss, metrics = rpo.compute_preference_loss(
        model, ref, loss_type="rpo", beta=2000.0, embeddings=embeddings, temperature=temperature, weight_scale=scale
    )
    assert loss.item() == pytest.approx(direct_rpo(model, ref, 2000.0, weights), rel=1e-6)
    diag = sum(weights[i][i] for i in range(3)) / 3
    assert metrics["weight_diag_mean"].item() == pytest.approx(diag, rel=1e-6)
    assert metrics["beta_effective_diag"].item() == pytest.approx(1000.0 * diag, rel=1e-6)


def test_rpo_with_one_pair_equals_dpo():
    model, ref, embeddings = random_losses(1, seed=2)
    dpo, _ = rpo.compute_preference_loss(model, ref, loss_type="dpo", beta=5000.0)
    for weighting in ("similarity", "uniform"):
        loss, _ = rpo.compute_preference_loss(
            model, ref, loss_type="rpo", beta=5000.0, embeddings=embeddings, weighting=weighting
        )
        assert loss.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_rpo_diagonal_equals_dpo_when_embeddings_separate_pairs():
    # Orthogonal pair embeddings with a tiny temperature put all the weight on the diagonal.
    model, ref, _ = random_losses(3, seed=3)
    basis = torch.eye(3, dtype=torch.float64)
    embeddings = torch.cat([basis, basis])
    dpo, _ = rpo.compute_preference_loss(model, ref, loss_type="dpo", beta=5000.0)
    loss, metrics = rpo.compute_preference_loss(
        model, ref, loss_type="rpo", beta=5000.0, embeddings=embeddings, temperature=0.01, weight_scale=1.0
    )
    # Off-diagonal weights are ~0, so each of those terms is ln 2; the 3 diagonal terms carry DPO's loss.
    assert loss.item() == pytest.approx((3 * dpo.item() + 6 * math.log(2)) / 9, rel=1e-6)
    assert metrics["weight_diag_mean"].item() == pytest.approx(1.0, rel=1e-6)


def test_sft_is_the_mean_winner_loss_of_2m_losses_winners_first():
    # One shape for every loss type: (2M,) winners first. SFT reads the winners' half only, with or without a
    # reference, and the losers' slots may be NaN (the training step does not denoise them).
    model, ref, _ = random_losses(3, seed=4)
    winners = model[:3]
    loss, metrics = rpo.compute_preference_loss(model, None, loss_type="sft", beta=5000.0)
    assert loss.item() == pytest.approx(winners.mean().item()) and loss.item() != pytest.approx(model.mean().item())
    not_denoised = torch.cat([winners, torch.full_like(winners, float("nan"))])
    assert rpo.compute_preference_loss(not_denoised, None, loss_type="sft", beta=5000.0)[0].item() == loss.item()
    assert rpo.compute_preference_loss(model, ref, loss_type="sft", beta=5000.0)[0].item() == loss.item()
    assert set(metrics) == {"model_mse_w"}
    with pytest.raises(ValueError, match=r"shape \(2M,\)"):
        rpo.compute_preference_loss(winners, None, loss_type="sft", beta=5000.0)  # 3 losses: not winners + losers


@pytest.mark.parametrize("loss_type", ["dpo", "rpo"])
def test_swapping_winner_and_loser_flips_the_logits(loss_type):
    model, ref, embeddings = random_losses(4, seed=5)

    def swap(x):
        w, l = x.chunk(2)
        return torch.cat([l, w])

    kwargs = {"loss_type": loss_type, "beta": 5000.0, "weighting": "uniform"}
    loss, metrics = rpo.compute_preference_loss(model, ref, **kwargs)
    loss_swapped, metrics_swapped = rpo.compute_preference_loss(swap(model), swap(ref), **kwargs)
    assert metrics_swapped["implicit_acc"].item() == pytest.approx(1 - metrics["implicit_acc"].item())
    # -log sigma(x) - (-log sigma(-x)) = -x: the loss difference is the mean logit, so it changes sign.
    m = 4
    delta = model - ref
    if loss_type == "dpo":
        mean_logit = (-(delta[:m] - delta[m:]) * 2500.0).mean()
    else:
        mean_logit = (-(delta[:m, None] - delta[None, m:]) * 2500.0).mean()
    assert (loss_swapped - loss).item() == pytest.approx(mean_logit.item(), rel=1e-6)


def test_gradients_reach_model_losses_only():
    model, ref, embeddings = random_losses(3, seed=6)
    model.requires_grad_(True)
    ref.requires_grad_(True)
    embeddings.requires_grad_(True)
    loss, _ = rpo.compute_preference_loss(model, ref, loss_type="rpo", beta=5000.0, embeddings=embeddings)
    loss.backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None and embeddings.grad is None
    # Winners are pushed down (negative gradient of loss w.r.t. their mse is positive: lower mse, lower loss).
    assert (model.grad[:3] > 0).all() and (model.grad[3:] < 0).all()


@pytest.mark.parametrize("loss_type", ["dpo", "rpo"])
def test_at_reference_loss_is_ln2_and_accuracy_half(loss_type):
    model, _, embeddings = random_losses(5, seed=7)
    loss, metrics = rpo.compute_preference_loss(
        model.float(), model.float().clone(), loss_type=loss_type, beta=5000.0, embeddings=embeddings.float()
    )
    assert loss.dtype == torch.float32
    assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert metrics["implicit_acc"].item() == 0.5


def test_bad_arguments_are_explained():
    model, ref, _ = random_losses(2)
    with pytest.raises(ValueError, match="loss_type"):
        rpo.compute_preference_loss(model, ref, loss_type="ipo", beta=1.0)
    with pytest.raises(ValueError, match="embeddings"):
        rpo.compute_preference_loss(model, ref, loss_type="rpo", beta=1.0)
    with pytest.raises(ValueError, match="same shape"):
        rpo.compute_preference_loss(model, None, loss_type="dpo", beta=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Stabilizers (docs/method.md, "Stabilizers")
# ---------------------------------------------------------------------------------------------------------------------


def test_dpo_positive_matches_hand_computed_value():
    # The hand example above: pair 2's winner error rose by 0.02 over the reference's, pair 1's fell.
    model = torch.tensor([0.10, 0.20, 0.30, 0.10], dtype=torch.float64)
    ref = torch.tensor([0.11, 0.18, 0.30, 0.12], dtype=torch.float64)
    beta, lam = 1000.0, 3.0
    # pair 1: z = 0.01, penalty 0; pair 2: z = -0.04, penalty 3 x 0.02 = 0.06 -> logit -0.10
    expected = -(logsigmoid(0.5 * beta * 0.01) + logsigmoid(0.5 * beta * -0.10)) / 2
    loss, metrics = rpo.compute_preference_loss(
        model, ref, loss_type="dpo", beta=beta, stabilizer="dpop", stabilizer_weight=lam
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["stabilizer_term"].item() == pytest.approx(3.0 * 0.02 / 2)
    assert metrics["delta_mse_w"].item() == pytest.approx((-0.01 + 0.02) / 2)
    assert metrics["delta_mse_l"].item() == pytest.approx((0.0 - 0.02) / 2)
    assert metrics["implicit_acc"].item() == 0.5  # accuracy reads the plain DPO logits


def test_rpo_dpo_positive_matches_a_direct_double_loop():
    model, ref, embeddings = random_losses(3, seed=11)
    model = model.clone()
    model[:3] += torch.tensor([2e-4, -1e-4, 3e-4], dtype=torch.float64)  # two winners got worse than the reference
    beta, lam, m = 5000.0, 2.0, 3
    weights = direct_similarity_weights(embeddings, 0.5, 1.0)
    expected = 0.0
    for i in range(m):
        delta_w = (model[i] - ref[i]).item()
        for j in range(m):
            z = -(delta_w - (model[m + j] - ref[m + j]).item()) - lam * max(0.0, delta_w)
            expected -= logsigmoid(weights[i][j] * 0.5 * beta * z)
    loss, _ = rpo.compute_preference_loss(
        model, ref, loss_type="rpo", beta=beta, embeddings=embeddings, stabilizer="dpop", stabilizer_weight=lam
    )
    assert loss.item() == pytest.approx(expected / m**2, rel=1e-9)


@pytest.mark.parametrize("loss_type", ["dpo", "rpo"])
def test_sft_stabilizer_adds_the_weighted_winner_error_and_its_gradient(loss_type):
    model, ref, embeddings = random_losses(4, seed=12)
    model = model.clone().requires_grad_(True)
    plain, _ = rpo.compute_preference_loss(model, ref, loss_type=loss_type, beta=5000.0, embeddings=embeddings)
    (plain_grad,) = torch.autograd.grad(plain, model)
    anchored, metrics = rpo.compute_preference_loss(
        model, ref, loss_type=loss_type, beta=5000.0, embeddings=embeddings, stabilizer="sft", stabilizer_weight=0.5
    )
    (anchored_grad,) = torch.autograd.grad(anchored, model)
    assert anchored.item() == pytest.approx(plain.item() + 0.5 * model[:4].mean().item(), rel=1e-12)
    assert metrics["stabilizer_term"].item() == pytest.approx(0.5 * model[:4].mean().item())
    torch.testing.assert_close(
        anchored_grad - plain_grad, torch.tensor([0.5 / 4] * 4 + [0.0] * 4, dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("stabilizer", ["dpop", "sft"])
def test_at_the_reference_dpop_gives_ln2_and_sft_adds_its_term(stabilizer):
    model, _, embeddings = random_losses(3, seed=13)
    loss, _ = rpo.compute_preference_loss(
        model, model.clone(), loss_type="rpo", beta=5000.0, embeddings=embeddings, stabilizer=stabilizer
    )
    offset = model[:3].mean().item() if stabilizer == "sft" else 0.0
    assert loss.item() == pytest.approx(math.log(2) + offset, rel=1e-12)


def test_stabilizer_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(["--loss_type", "sft", "--stabilizer", "dpop"])
    assert "--stabilizer dpop needs a preference loss" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown stabilizer"):
        rpo.compute_preference_loss(*random_losses(2)[:2], loss_type="dpo", beta=1.0, stabilizer="dpo_positive")
