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


def test_proxy_anchor_uses_its_alpha():
    """Kim et al. 2020, eq. 4, by hand: the scale reaches the loss, not only its attribute."""
    torch.manual_seed(0)
    emb, labels = torch.randn(12, 6), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 1])
    margin, alpha = 0.1, 16.0
    loss = build_loss("proxy_anchor", margin, num_classes=4, dim=6, proxy_alpha=alpha)
    sim = (
        torch.nn.functional.normalize(emb, dim=1)
        @ torch.nn.functional.normalize(loss.loss.proxies, dim=1).T
    )
    positive = torch.nn.functional.one_hot(labels, 4).bool()
    pos_terms = [
        torch.log1p(torch.exp(-alpha * (sim[positive[:, c], c] - margin)).sum())
        for c in range(4)
        if positive[:, c].any()
    ]
    neg_terms = [
        torch.log1p(torch.exp(alpha * (sim[~positive[:, c], c] + margin)).sum()) for c in range(4)
    ]
    expected = sum(pos_terms) / len(pos_terms) + sum(neg_terms) / 4
    got = loss(emb, labels).item()
    assert abs(got - expected.item()) < 1e-4
    default = build_loss("proxy_anchor", margin, num_classes=4, dim=6)
    default.loss.proxies.data.copy_(loss.loss.proxies.data)
    assert abs(default(emb, labels).item() - got) > 0.1
