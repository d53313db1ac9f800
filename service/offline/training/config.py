"""What a training run is told (:class:`TrainConfig`): the model and its settings, the loss,
the budget, and the validation figure epochs and settings are chosen on."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from service.model.acf import ACFConfig, Visual

ModelName = Literal["acf", "sasrec", "bpr_mf", "vbpr", "ease", "transitions", "popularity"]
MODELS: tuple[ModelName, ...] = (
    "acf",
    "sasrec",
    "transitions",
    "ease",
    "bpr_mf",
    "vbpr",
    "popularity",
)
# Fitted, not trained: no randomness, so one fit stands for every seed
FITTED: frozenset[ModelName] = frozenset({"transitions", "ease", "popularity"})
LossName = Literal["softmax", "bpr", "warp"]
LOSS_NAMES: tuple[LossName, ...] = ("softmax", "bpr", "warp")
# Epochs and settings are chosen on the mean of validation nDCG@20 under both protocols (see
# :mod:`service.offline.evaluation.evaluate`): the page compares models under both, so choosing
# on one would tune every model for half of what is reported.
SELECTION_METRIC = "mean nDCG@20"
# The served row is chosen on `standard` validation alone: it is what the service does (the
# last 9 items as profile, everything the user has seen left out).
SERVING_METRIC = "nDCG@20"
READS_USER = "reads user"  # validation row key: whether a protocol reads ACF's user vector


def reads_user_key(protocol: str) -> str:
    """The validation row's key saying whether ``protocol`` reads ACF's user embeddings."""
    return READS_USER if protocol == "standard" else f"{protocol} {READS_USER}"


POOLS = ("attention", "mean")
CHOICES = {"visual": get_args(Visual), "component_pool": POOLS, "item_pool": POOLS}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; all of it is stored in the checkpoint.

    One flat set of settings for every model; each model reads the ones it has (``dim`` is
    everyone's, ``ease_l2`` only EASE's). The defaults are this project's ACF: softmax loss,
    the image reaching the score, centred and projected components, recency in the item
    attention. ``configs/tutorial.toml`` gives the VisRec tutorial's ACF.
    """

    model: ModelName = "acf"
    dim: int = 64
    attention_dim: int = 64
    epochs: int = 40
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5  # L2 (Adam's); the tutorial found 0 < λ < 1e-4 necessary
    loss: LossName = "softmax"
    negatives: int = 2048  # sampled softmax: catalogue items drawn per batch
    # Above this many items, softmax samples its negatives. `benchmarks/softmax_cost.py` (2-core
    # CPU, batch 512, dim 64): the whole-catalogue loss step took 5.1 / 26.5 / 75.8 / 187 ms at
    # 2k / 10k / 20k / 50k items against 7.5 / 8.9 / 11.8 / 20.8 ms sampled; at 10k it is 3x the
    # sampled one and as much as the rest of an ACF step (~31 ms on ml100k), so it stops there.
    full_softmax_items: int = 10_000
    profile_size: int = 9
    # Batches are made of shuffled runs of this many consecutive samples of one user: their
    # profiles overlap, so ACF computes component attention for far fewer (user, item) pairs.
    sample_run: int = 16
    # ACF and SASRec (softmax loss): every position of a stretch of profile_size + 1 items of a
    # user trained in one pass (sampling.chunk_batches), as SASRec is, instead of one pass per
    # window. Validation, 3 seeds, ACF with context blocks: nDCG@20 0.1547 against 0.1586 a
    # pass per window, ~10 s an epoch against 17.6 s (README). Other models: a pass per window.
    every_position: bool = False
    profile_dropout: float = 0.0  # training: each profile item is hidden with this probability
    # ACF
    visual: Visual = "score"
    component_pool: Literal["attention", "mean"] = "attention"
    # How a candidate's own image vector pools its components (ACFConfig.item_pool). The
    # attention, measured on validation (3 seeds; README, "The model"): +0.090 precision@20 on
    # new items where distractors are as large as the object, level with the mean elsewhere
    # (ml100k: -0.004 R@20 [-0.019, +0.011], at 1.8x the training time), and flatter component
    # attention on the profile side; so the mean stays the default.
    item_pool: Literal["mean", "attention"] = "mean"
    recency: bool = True  # learned vectors per profile position in the item attention
    newest: bool = True  # the item attention is also conditioned on the newest profile item
    # the item attention also reads how long before the profile's newest item each one came
    # (bucketed: service.model.acf.AGE_EDGES_S); needs the interactions' timestamps
    ages: bool = False
    centre_components: bool = True  # subtract each grid cell's catalogue mean
    feature_rank: int = 128  # principal directions kept; 0: all C raw dims
    # training: minus this times the item attention's mean normalised entropy is added to the
    # loss, against attention that collapses onto one profile item
    entropy_bonus: float = 0.0
    tied: bool = True
    item_term: bool = False
    item_bias: bool = True
    score_scale: float | None = 1.0  # None: 1 / dim, as in the tutorial
    # Order inside ACF's profile: causal self-attention blocks (SASRec's, with its ``heads``
    # and ``dropout``) contextualise the profile items before the item attention pools them.
    # configs/reproduce.toml's ACF has 2 (validation; README); the default stays 0 until the
    # whole plan has been run with them.
    context_blocks: int = 0
    user_embedding: bool = True  # False: ACF's user vector comes from the profile alone
    # training: each sample's user embedding is left out with this probability, so a user's
    # embedding cannot stand in for their recent items (and unknown users are trained for)
    user_dropout: float = 0.0
    # training, ACF with visual="score": each step, this share of the catalogue is scored
    # without its item embedding (its image, bias and profile side unchanged), so the image
    # path learns to rank an item alone, as it must for an item added after training
    item_dropout: float = 0.0
    # ACF: the items' genres (items.csv) as a second content channel beside the image, on
    # both the profile and the candidate side (ACFConfig.tags); POST /items then takes them
    metadata: bool = False
    # with metadata, the title's words and decade too (service.model.tags)
    titles: bool = False
    # SASRec (2 blocks and 1 head, as in the paper's ml-1m setting); ACF's context blocks
    dropout: float = 0.2
    blocks: int = 2
    heads: int = 1
    # fitted baselines
    ease_l2: float = 200.0
    transition_window: int = 5
    transition_decay: float = 0.8
    popularity_weight: float = 0.1
    patience: int = 5  # stop after this many epochs without a better validation nDCG@20
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "dim",
            "attention_dim",
            "epochs",
            "batch_size",
            "lr",
            "negatives",
            "full_softmax_items",
            "profile_size",
            "sample_run",
            "blocks",
            "heads",
            "transition_window",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) <= 0]
        shares = ("profile_dropout", "dropout", "user_dropout", "item_dropout")
        bad += [f"{n}={getattr(self, n)}" for n in shares if not 0 <= getattr(self, n) < 1]
        non_negative = (
            "weight_decay",
            "patience",
            "ease_l2",
            "entropy_bonus",
            "feature_rank",
            "context_blocks",
        )
        bad += [f"{n}={getattr(self, n)}" for n in non_negative if getattr(self, n) < 0]
        if self.model not in MODELS or self.loss not in LOSS_NAMES:
            bad.append(f"model={self.model!r}, loss={self.loss!r}")
        bad += [
            f"{name}={getattr(self, name)!r} (one of {', '.join(allowed)})"
            for name, allowed in CHOICES.items()
            if getattr(self, name) not in allowed
        ]
        if self.trains_every_position and (self.loss != "softmax" or self.entropy_bonus):
            bad.append(
                f"every_position=True with loss={self.loss!r}, entropy_bonus="
                f"{self.entropy_bonus} (it needs the softmax loss and no entropy bonus; "
                "say every_position=false)"
            )
        if self.titles and not self.metadata:
            bad.append("titles=True without metadata=True (titles are part of the metadata)")
        if bad:
            raise ValueError(f"invalid training setting(s): {'; '.join(bad)}")

    @property
    def trains_every_position(self) -> bool:
        return self.every_position and self.model in ("acf", "sasrec")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown training setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**values)

    def acf_config(
        self,
        *,
        n_users: int,
        n_items: int,
        n_components: int,
        feature_dim: int,
        tags: tuple[str, ...] = (),
    ) -> ACFConfig:
        return ACFConfig(
            n_users=n_users,
            n_items=n_items,
            feature_dim=feature_dim,
            n_components=n_components,
            dim=self.dim,
            attention_dim=self.attention_dim,
            tied=self.tied,
            item_term=self.item_term,
            item_bias=self.item_bias,
            component_pool=self.component_pool,
            item_pool=self.item_pool,
            visual=self.visual,
            recency=self.profile_size if self.recency else 0,
            newest=self.newest,
            score_scale=self.score_scale,
            users=self.user_embedding,
            context_blocks=self.context_blocks,
            heads=self.heads,
            dropout=self.dropout,
            positions=self.profile_size,
            tags=tags if self.metadata else (),
            ages=self.ages,
        )
