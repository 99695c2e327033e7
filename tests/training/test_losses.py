import torch

from siamese_cv.training.losses import build_loss, build_miner, list_losses


def test_original_loss_equals_the_notebooks_formula():
    torch.manual_seed(0)
    emb = torch.randn(12, 8) * 2
    labels = torch.arange(12) % 4
    a, p, n = torch.arange(4), torch.arange(4, 8), torch.arange(8, 12)
    expected = torch.relu(
        ((emb[a] - emb[p]) ** 2).sum(1) - ((emb[a] - emb[n]) ** 2).sum(1) + 1.0
    ).mean()
    got = build_loss("triplet_l2sq", 1.0)(emb, labels, (a, p, n))
    assert torch.allclose(got, expected, atol=1e-5)


def test_cosine_triplet_loss_equals_a_hand_loop():
    torch.manual_seed(1)
    emb = torch.randn(90, 5)
    labels = torch.zeros(90, dtype=torch.long)
    a, p, n = torch.arange(30), torch.arange(30, 60), torch.arange(60, 90)
    unit = torch.nn.functional.normalize(emb, dim=1)
    losses = [
        max(0.0, float(unit[i] @ unit[k] - unit[i] @ unit[j] + 0.2))
        for i, j, k in zip(a, p, n, strict=True)
    ]
    nonzero = [x for x in losses if x > 0]
    assert 0 < len(nonzero) < len(losses)
    expected = sum(nonzero) / len(nonzero)
    got = build_loss("triplet_cosine", 0.2)(emb, labels, (a, p, n))
    assert abs(float(got) - expected) < 1e-5


def test_every_loss_trains_and_miners_mine():
    emb = torch.randn(16, 6, requires_grad=True)
    labels = torch.arange(16) % 4
    for name in list_losses():
        loss = build_loss(name, 0.2, num_classes=4, dim=6)(emb, labels, None)
        loss.backward()
        assert torch.isfinite(loss)
    for miner in ("semihard", "batch_hard", "multi_similarity"):
        mined = build_miner(miner, 0.2, "triplet_cosine")(emb.detach(), labels)
        assert len(mined) in (3, 4)
