"""OT prototypes: the cost's two terms, barycentres, the EMA step, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from model_export.ot_prototypes import (
    FIRST_ENSEMBLE,
    MemberConfig,
    OTPrototypesConfig,
    PrototypeMember,
    barycentres,
    ema_update,
    feature_cost,
    fit_member,
    grid_positions,
    spatial_cost,
    transport_cost,
)
from model_export.sinkhorn import log_sinkhorn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_costs_are_normalised() -> None:
    x = torch.randn(50, 8, generator=_gen(0))
    fc = feature_cost(x, torch.cat([x[:5], -x[:5]]))
    assert fc.min() >= 0 and fc.max() <= 1
    assert torch.allclose(fc[torch.arange(5), torch.arange(5)], torch.zeros(5), atol=1e-6)
    assert torch.allclose(fc[torch.arange(5), torch.arange(5) + 5], torch.ones(5), atol=1e-6)
    pos = grid_positions(4, 4)
    sc = spatial_cost(pos, pos)
    assert torch.allclose(sc.diagonal(), torch.zeros(16), atol=1e-3)
    assert sc.max() <= 1.0
    corners = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert math.isclose(float(spatial_cost(corners[:1], corners[1:])), 1.0, rel_tol=1e-5)


def test_alpha_zero_makes_positions_irrelevant() -> None:
    x, p = torch.randn(30, 6, generator=_gen(1)), torch.randn(12, 6, generator=_gen(2))
    pos_a, pos_b = torch.rand(30, 2, generator=_gen(3)), torch.rand(30, 2, generator=_gen(4))
    proto_a, proto_b = torch.rand(12, 2, generator=_gen(5)), torch.rand(12, 2, generator=_gen(6))
    ca = transport_cost(x, pos_a, p, proto_a, alpha=0.0)
    assert torch.equal(ca, transport_cost(x, pos_b, p, proto_b, alpha=0.0))
    # ...and positions do matter as soon as alpha > 0.
    assert not torch.allclose(
        transport_cost(x, pos_a, p, proto_a, 0.3), transport_cost(x, pos_b, p, proto_b, 0.3)
    )


def test_alpha_one_makes_features_irrelevant() -> None:
    pos, proto_pos = torch.rand(30, 2, generator=_gen(7)), torch.rand(12, 2, generator=_gen(8))
    x_a, x_b = torch.randn(30, 6, generator=_gen(9)), torch.randn(30, 6, generator=_gen(10))
    p_a, p_b = torch.randn(12, 6, generator=_gen(11)), torch.randn(12, 6, generator=_gen(12))
    ca = transport_cost(x_a, pos, p_a, proto_pos, alpha=1.0)
    assert torch.equal(ca, transport_cost(x_b, pos, p_b, proto_pos, alpha=1.0))
    assert not torch.allclose(
        transport_cost(x_a, pos, p_a, proto_pos, 0.7), transport_cost(x_b, pos, p_b, proto_pos, 0.7)
    )


def test_barycentre_of_a_hard_assignment_is_the_assigned_point() -> None:
    x = torch.randn(6, 3, generator=_gen(13))
    plan = torch.zeros(6, 6)
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    plan[torch.arange(6), perm] = 1 / 6
    b = barycentres(plan, x)
    assert torch.allclose(b[perm], x)


def test_ema_moves_prototypes_toward_the_barycentre() -> None:
    x = torch.randn(64, 5, generator=_gen(14))
    protos = torch.randn(8, 5, generator=_gen(15))
    plan = log_sinkhorn(feature_cost(x, protos), epsilon=0.05, iterations=100).plan
    target = barycentres(plan, x)
    moved = ema_update(protos, target, ema=0.95)
    before = (protos - target).norm(dim=1)
    after = (moved - target).norm(dim=1)
    assert torch.allclose(after, 0.95 * before, atol=1e-5)
    assert torch.equal(ema_update(protos, target, ema=0.0), target)


def test_fitting_pulls_prototypes_toward_their_cell_and_scores_normal_low() -> None:
    # Features that depend on the cell only (plus noise): after fitting, local
    # prototypes sit near their cell's mean and a foreign patch scores high.
    h = w = 4
    gen = _gen(16)
    cell_means = torch.randn(h * w, 16, generator=gen)
    feats = cell_means.T.reshape(1, 16, h, w) + 0.05 * torch.randn(20, 16, h, w, generator=gen)
    member = PrototypeMember(MemberConfig("s16", 0.3, 2), dim=16, grid=(h, w))
    config = OTPrototypesConfig(members=(member.config,), epochs=3, sinkhorn_iterations=50)
    fit_member(member, feats, config)
    protos = member.prototypes.reshape(h * w, 2, 16)
    cos = torch.nn.functional.cosine_similarity(protos, cell_means[:, None], dim=-1)
    assert cos.min() > 0.95
    normal = member(feats[:4]).max()
    odd = feats[:1].clone()
    odd[..., 1, 2] = torch.randn(16, generator=gen) * 3
    assert member(odd)[0, 1, 2] > 3 * normal


def test_config_round_trip_and_validation() -> None:
    cfg = OTPrototypesConfig(members=(MemberConfig("s8", 0.25, 2),), epsilon=0.1)
    assert OTPrototypesConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="alpha"):
        MemberConfig("s8", 1.5)
    with pytest.raises(ValueError, match="scale"):
        MemberConfig("s4", 0.0)
    with pytest.raises(ValueError, match="ema"):
        OTPrototypesConfig(ema=1.0)


def test_the_config_reads_what_the_earlier_dataclass_config_wrote() -> None:
    # dataclasses.asdict of the earlier OTPrototypesConfig: members a tuple of dicts.
    written = {
        "members": (
            {"scale": "s8", "alpha": 0.0, "prototypes_per_position": 4},
            {"scale": "s16", "alpha": 0.5, "prototypes_per_position": 16},
        ),
        "epsilon": 0.05,
        "sinkhorn_iterations": 30,
        "ema": 0.95,
        "epochs": 1,
        "images_per_batch": 4,
        "prototypes_per_problem": 512,
        "smoothing_sigma": 4.0,
        "seed": 0,
    }
    cfg = OTPrototypesConfig.from_dict(written)
    assert cfg.members == (MemberConfig("s8", 0.0, 4), MemberConfig("s16", 0.5, 16))
    # A field it did not have takes today's default (a checkpoint of that time
    # records what it was trained on: families.load_checkpoint).
    # The backbone is the one it was fitted on, the only one then.
    expected = {**written, "members": list(written["members"]), "input_normalisation": "backbone",
                "backbone": "efficientnet_lite0"}  # type: ignore[call-overload]  # fmt: skip
    assert cfg.to_dict() == expected
    # A whole config of today's form without the backbone: Lite0 too; settings
    # over the defaults (the command line's) take today's default.
    whole = OTPrototypesConfig().to_dict()
    del whole["backbone"]
    assert OTPrototypesConfig.from_dict(whole).backbone == "efficientnet_lite0"
    assert OTPrototypesConfig.from_dict({"epochs": 2}).backbone == "efficientnet_lite2"
    # No members: the ensemble that was the default then, whatever today's is.
    first = OTPrototypesConfig(members=FIRST_ENSEMBLE)
    assert OTPrototypesConfig.from_dict({"members": ()}) == first
    # No members key (the command line's defaults): today's default.
    assert OTPrototypesConfig.from_dict({}) == OTPrototypesConfig()
    assert len(OTPrototypesConfig().members) == len(FIRST_ENSEMBLE) + 1
    with pytest.raises(ValueError, match="unknown"):
        OTPrototypesConfig.from_dict({**written, "unknown": 1})
