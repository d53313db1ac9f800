"""Training on the synthetic visual world, where the right answer is known."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.model.acf import ACF, UNKNOWN_USER, Attended
from service.model.checkpoint import load_checkpoint
from service.model.feature_store import load_features
from service.offline.cli import main
from service.offline.data.sampling import Samples, build_samples
from service.offline.data.synthetic import World
from service.offline.evaluation.attention import (
    COMPONENT_ENTROPY,
    COMPONENT_MAX,
    FLAT,
    ITEM_ENTROPY,
    ITEM_MAX,
    attention_probe,
)
from service.offline.evaluation.evaluate import evaluate, holdout_task, validation_task
from service.offline.training.config import READS_USER, SELECTION_METRIC, TrainConfig
from service.offline.training.objective import Objective
from service.offline.training.pipeline import Prepared, fit, prepare, to_checkpoint
from service.offline.training.train import TrainResult, as_scored, build_model, train

CPU = torch.device("cpu")
SMALL = TrainConfig(dim=16, attention_dim=16, epochs=12, batch_size=128, lr=1e-2, patience=0)


@pytest.fixture(scope="module")
def prepared(world: World, world_features: tuple[Path, np.ndarray]) -> Prepared:
    return prepare(world.root, world_features[0])


@pytest.fixture(scope="module")
def acf(prepared: Prepared) -> TrainResult:
    return fit(prepared, SMALL, device=CPU, progress=False)


def test_acf_beats_popularity_where_taste_is_known(prepared: Prepared, acf: TrainResult) -> None:
    pop = fit(prepared, replace(SMALL, model="popularity"), device=CPU, progress=False)
    task = holdout_task(prepared.split, "standard")
    ours = evaluate(acf.model, task, device=CPU)  # type: ignore[arg-type]
    base = evaluate(pop.model, task, device=CPU)  # type: ignore[arg-type]
    assert ours["AUC"].mean() > base["AUC"].mean() + 0.15
    assert ours["R@20"].mean() > base["R@20"].mean() + 0.1


def test_recommendations_are_of_the_users_kind(
    world: World, prepared: Prepared, acf: TrainResult
) -> None:
    task = holdout_task(prepared.split, "standard")
    with torch.no_grad():
        scores = acf.model.score_all(torch.as_tensor(task.users), torch.as_tensor(task.profiles))
    seen = np.zeros(scores.shape, dtype=bool)
    for u, items in enumerate(prepared.split.train_sequences()):
        seen[u, items - 1] = True
    scores[torch.as_tensor(seen[task.users])] = -torch.inf
    top = scores.topk(10).indices.numpy()  # item columns = item id - 1
    share = (world.item_kinds[top] == world.user_kinds[task.users][:, None]).mean()
    assert share > 0.8  # chance is about 0.25


def test_the_best_epoch_is_kept_not_the_last(prepared: Prepared, acf: TrainResult) -> None:
    history = [h[SELECTION_METRIC] for h in acf.history]
    assert acf.best_epoch == 1 + int(np.argmax(history))
    # Chosen on both protocols' validation: what the kept weights score on each, and their mean
    scores = {
        protocol: evaluate(  # type: ignore[arg-type]
            as_scored(acf.model, acf.validation, protocol),
            validation_task(prepared.split, protocol),
            device=CPU,
        )
        for protocol in ("standard", "seed")
    }
    assert scores["standard"]["nDCG@20"].mean() == pytest.approx(acf.validation["nDCG@20"])
    assert scores["seed"]["nDCG@20"].mean() == pytest.approx(acf.validation["seed nDCG@20"])
    assert acf.validation[SELECTION_METRIC] == pytest.approx(
        (acf.validation["nDCG@20"] + acf.validation["seed nDCG@20"]) / 2
    )


def test_each_protocol_reads_the_user_vector_where_its_validation_ranks_better_with_it(
    prepared: Prepared, acf: TrainResult
) -> None:
    row = acf.validation
    assert isinstance(acf.model, ACF) and acf.model.user_embedding is not None
    for protocol, prefix in (("standard", ""), ("seed", "seed ")):
        task = validation_task(prepared.split, protocol)
        with_user = evaluate(acf.model, task, device=CPU)["nDCG@20"].mean()
        without = evaluate(acf.model.without_users(), task, device=CPU)["nDCG@20"].mean()
        assert row[f"{prefix}nDCG@20 with user"] == pytest.approx(with_user)
        assert row[f"{prefix}nDCG@20 without user"] == pytest.approx(without)
        assert row[f"{prefix}nDCG@20"] == pytest.approx(max(with_user, without))
        assert row[f"{prefix}{READS_USER}"] == float(with_user >= without)
    # Where a protocol's validation chose the profile alone, that protocol scores every user as
    # one the model never met, and the trained model keeps its embeddings.
    alone = as_scored(acf.model, {**row, f"seed {READS_USER}": 0.0}, "seed")
    assert isinstance(alone, ACF) and alone.user_embedding is None
    assert acf.model.user_embedding is not None
    task = holdout_task(prepared.split, "seed")
    users, profiles = torch.as_tensor(task.users), torch.as_tensor(task.profiles)
    with torch.no_grad():
        unknown = acf.model.score_all(torch.full_like(users, UNKNOWN_USER), profiles)
        known = acf.model.score_all(users, profiles)
        torch.testing.assert_close(alone.score_all(users, profiles), unknown)
    assert not torch.allclose(known, unknown)  # the embeddings did count before
    assert as_scored(acf.model, {**row, f"seed {READS_USER}": 1.0}, "seed") is acf.model


def test_the_checkpoint_reads_users_as_standard_validation_chose(
    prepared: Prepared, acf: TrainResult
) -> None:
    best = acf.best_epoch - 1
    history = [dict(h) for h in acf.history]
    history[best][READS_USER] = 0.0
    ckpt = to_checkpoint(prepared, replace(acf, history=history), SMALL)
    assert ckpt.config.users is False and not any(k.startswith("user_") for k in ckpt.state)
    model = ckpt.build_model(
        prepared.features, inputs_hash=prepared.meta.inputs_hash, item_ids=prepared.meta.item_ids
    )
    assert isinstance(model, ACF) and model.user_embedding is None
    kept = to_checkpoint(prepared, acf, SMALL)  # the fixture's own choice
    assert kept.config.users is bool(acf.validation[READS_USER])


def test_training_is_reproducible(prepared: Prepared) -> None:
    config = replace(SMALL, epochs=2, loss="warp", every_position=False)
    a = fit(prepared, config, device=CPU, progress=False)
    b = fit(prepared, config, device=CPU, progress=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h[ITEM_ENTROPY] for h in a.history] == [h[ITEM_ENTROPY] for h in b.history]
    for (name, x), y in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_attention_statistics_are_kept_every_epoch(acf: TrainResult) -> None:
    keys = (ITEM_ENTROPY, ITEM_MAX, COMPONENT_ENTROPY, COMPONENT_MAX)
    assert len(acf.history) == SMALL.epochs
    for row in acf.history:
        assert all(0.0 <= row[k] <= 1.0 for k in keys), row
        assert row[COMPONENT_MAX] >= 1 / 49 and row[ITEM_MAX] >= 1 / SMALL.profile_size
    # The world has a right answer (one kind per user, the object in one part of the image),
    # so both attentions move away from uniform as the model learns it.
    first, kept = acf.history[0], acf.validation
    assert kept[ITEM_ENTROPY] < min(first[ITEM_ENTROPY], FLAT)
    assert kept[COMPONENT_ENTROPY] < min(first[COMPONENT_ENTROPY], FLAT)


def _train_with_frozen_attention(prepared: Prepared, scale: float) -> TrainResult:
    """One epoch of ACF whose attention logits are scaled by ``scale`` and then frozen:
    0 makes both attentions exactly uniform, a large scale makes them peaked."""
    config = replace(SMALL, epochs=1)
    split = prepared.split
    model = build_model(config, split, prepared.features)
    assert isinstance(model, ACF)
    with torch.no_grad():
        for layer in (model.item_out, model.comp_out):
            layer.weight.mul_(scale)
            layer.bias.fill_(0.1).mul_(scale)
            layer.requires_grad_(False)
    validation = validation_task(split)
    return train(
        model,
        build_samples(split.train_sequences(), n_items=split.n_items, profile_size=9),
        [validation],
        config,
        device=CPU,
        rng=np.random.default_rng(0),
        probe=attention_probe(validation, np.random.default_rng(1)),
        progress=False,
    )


@pytest.mark.parametrize(("scale", "flat"), [(0.0, ["item", "component"]), (30.0, [])])
def test_flat_attention_is_warned_about(
    prepared: Prepared, caplog: pytest.LogCaptureFixture, scale: float, flat: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.offline.training.train"):
        result = _train_with_frozen_attention(prepared, scale)
    warnings = [r.getMessage() for r in caplog.records if "attention is flat" in r.getMessage()]
    assert [w.split(": ")[1].split("-level")[0] for w in warnings] == flat
    if flat:
        assert result.validation[ITEM_ENTROPY] == pytest.approx(1.0)
        assert result.validation[COMPONENT_ENTROPY] == pytest.approx(1.0)
    else:
        assert result.validation[ITEM_ENTROPY] < 0.5 and result.validation[COMPONENT_ENTROPY] < 0.5


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "bpr_mf"},
        {"model": "vbpr"},
        {"model": "sasrec"},
        {"component_pool": "mean"},
        {"visual": "none"},
        {
            "visual": "attention",
            "loss": "bpr",
            "every_position": False,
            "centre_components": False,
            "feature_rank": 0,
        },
        {"loss": "softmax", "full_softmax_items": 1, "negatives": 64},  # sampled softmax
        {"context_blocks": 2},  # order inside the profile
        {"user_embedding": False},
        {"user_dropout": 0.5},
        {"item_dropout": 0.5},
        {"context_blocks": 2, "every_position": True},
        {"ages": True},
        {"ages": True, "context_blocks": 1, "every_position": True},
        {"model": "sasrec", "every_position": True},
        {"model": "transitions"},
        {"model": "ease"},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_every_model_and_loss_learns_something(prepared: Prepared, changes: dict) -> None:
    config = replace(SMALL, epochs=4, **changes)
    result = fit(prepared, config, device=CPU, progress=False)
    if result.best_epoch:  # trained, not fitted
        losses = [h["loss"] for h in result.history]
        assert losses[-1] < losses[0]
    pop = fit(prepared, replace(SMALL, model="popularity"), device=CPU, progress=False)
    popular = evaluate(pop.model, validation_task(prepared.split), device=CPU)  # type: ignore[arg-type]
    assert result.validation["R@20"] > popular["R@20"].mean() + 0.05
    if isinstance(result.model, ACF):
        assert result.model.config.component_pool == config.component_pool
        assert result.model.config.visual == config.visual


def test_command_line_end_to_end(
    world: World, prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    feats = tmp_path / "feats"
    assert (
        main(["features", str(world.root), "--out", str(feats), "--backbone", "mobilenet_v2"]) == 0
    )
    ckpt = tmp_path / "acf.pt"
    assert (
        main(
            [
                "train",
                str(world.root),
                "--features",
                str(feats),
                "--out",
                str(ckpt),
                "--epochs",
                "2",
                "--batch-size",
                "128",
                "--dim",
                "8",
                "--attention-dim",
                "8",
                "--no-tied",
                "--item-term",
                "--lr",
                "0.01",
            ]
        )
        == 0
    )
    assert ckpt.is_file()
    with Image.open(ckpt.with_suffix(".png")) as plot:  # loss, validation and attention panels
        assert plot.format == "PNG" and plot.size == (1800, 800)
    assert ckpt.with_suffix(".png").stat().st_size > 20_000
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(world.root),
                "--checkpoint",
                str(ckpt),
                "--features",
                str(feats),
                "--protocol",
                "standard",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"standard"}
    loaded = load_checkpoint(ckpt)
    assert loaded.train_config["tied"] is False and loaded.config.item_term is True
    assert loaded.config.feature_dim == 128  # centred, then projected from 1280 raw dims
    assert loaded.projection is not None and loaded.projection["basis"].shape == (1280, 128)
    assert loaded.features["backbone"] == "mobilenet_v2"
    assert [ITEM_ENTROPY in h and COMPONENT_ENTROPY in h for h in loaded.history] == [True, True]
    assert sum(loaded.item_popularity) == len(prepared.split.train_items)
    assert len(loaded.item_popularity) == len(loaded.item_ids)
    features, meta = load_features(feats)
    model = loaded.build_model(features, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids)
    table = evaluate(model, holdout_task(prepared.split, "standard"), device=CPU)
    assert printed["standard"]["AUC"]["mean"] == pytest.approx(table["AUC"].mean())
    assert printed["standard"]["nDCG@20"]["mean"] == pytest.approx(table["nDCG@20"].mean())


def test_command_line_refuses_features_of_another_dataset(
    world: World,
    world_features: tuple[Path, np.ndarray],
    tmp_path: Path,
    ml100k: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert (
        main(
            [
                "train",
                str(ml100k),
                "--features",
                str(world_features[0]),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )
    assert "re-run `visrec features`" in caplog.text
    out = tmp_path / "y.pt"
    args = ["train", str(world.root), "--features", str(world_features[0]), "--out", str(out)]
    assert main([*args, "--epochs", "0"]) == 2
    assert "epochs=0" in caplog.text
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"ease_l2": -1.0}, "ease_l2=-1.0"),
        ({"entropy_bonus": -0.1}, "entropy_bonus=-0.1"),
        ({"feature_rank": -1}, "feature_rank=-1"),
        ({"item_pool": "max"}, "item_pool='max'"),
        ({"visual": "both"}, "visual='both'"),
        ({"user_dropout": 1.0}, "user_dropout=1.0"),
        ({"item_dropout": -0.1}, "item_dropout=-0.1"),
        ({"context_blocks": -1}, "context_blocks=-1"),
        ({"loss": "bpr", "every_position": True}, "every_position=True"),
        ({"entropy_bonus": 0.1, "every_position": True}, "every_position=True"),
        ({"titles": True}, "titles=True without metadata"),
    ],
)
def test_a_bad_setting_is_refused_by_name(change: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=f"invalid training setting.*{named}"):
        TrainConfig(**change)  # type: ignore[arg-type]


def test_user_dropout_hides_a_share_of_users_as_unknown(
    prepared: Prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(SMALL, user_dropout=0.5)
    model = build_model(config, prepared.split, prepared.features)
    assert isinstance(model, ACF)
    samples, batch = _first_samples(prepared, 1000)
    seen: list[torch.Tensor] = []
    real_attend = model.attend_profiles

    def spy(users: torch.Tensor, profiles: torch.Tensor, times: torch.Tensor | None) -> Attended:
        seen.append(users)
        return real_attend(users, profiles, times)

    monkeypatch.setattr(model, "attend_profiles", spy)
    users = batch[0]
    Objective.create(config, samples, CPU)(model, batch, torch.Generator().manual_seed(0))
    hidden = seen[0] == UNKNOWN_USER
    assert 0.4 < float(hidden.float().mean()) < 0.6
    assert torch.equal(seen[0][~hidden], users[~hidden])  # the others are themselves


def test_item_dropout_scores_a_share_of_the_catalogue_by_image_and_bias_alone(
    prepared: Prepared,
) -> None:
    config = replace(SMALL, item_dropout=0.5)
    model = build_model(config, prepared.split, prepared.features)
    assert isinstance(model, ACF)
    samples, batch = _first_samples(prepared, 64)
    with torch.no_grad():
        model.item_embedding.weight.normal_()
    full = model.item_vectors()
    hidden = torch.zeros(model.config.n_items + 1, dtype=torch.bool)
    hidden[1::2] = True  # items 1, 3, 5, ...
    dropped = model.item_vectors(hidden=hidden)
    image = model.item_vectors(hidden=torch.ones_like(hidden))
    assert torch.equal(dropped[0::2], image[0::2]) and torch.equal(dropped[1::2], full[1::2])
    embedding = model.item_embedding.weight[1:] * model.config.scale
    torch.testing.assert_close(full[:, :-1] - image[:, :-1], embedding)
    assert torch.equal(full[:, -1], image[:, -1])  # the bias stays
    # Training hides about the share asked for, drawn from the step's generator
    seen: list[torch.Tensor] = []
    real = model.item_vectors

    def spy(
        items: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert hidden is not None
        seen.append(hidden)
        return real(items, hidden=hidden)

    model.item_vectors = spy  # type: ignore[method-assign]
    Objective.create(config, samples, CPU)(model, batch, torch.Generator().manual_seed(0))
    assert 0.35 < float(seen[0][1:].float().mean()) < 0.65


def _first_samples(prepared: Prepared, n: int) -> tuple[Samples, tuple[torch.Tensor, ...]]:
    """The training samples, and a batch of their first ``n`` (users stand in as negatives)."""
    samples = build_samples(
        prepared.split.train_sequences(), n_items=prepared.split.n_items, profile_size=9
    )
    users = torch.as_tensor(samples.users[:n])
    profiles = torch.as_tensor(samples.profiles[:n])
    times = torch.zeros(0, 0, dtype=torch.long)  # none: the model reads no ages
    return samples, (users, profiles, torch.as_tensor(samples.positives[:n]), users, times)


def test_training_leaves_subnormal_floats_as_they_were(acf: TrainResult) -> None:
    """Training flushes them to zero for speed (runtime.subnormals_flushed); the rest of the
    process, e.g. a property-based test library, needs IEEE behaviour back."""
    assert acf.best_epoch > 0  # the fixture trained
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
