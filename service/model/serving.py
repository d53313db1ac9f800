"""A trained model prepared for serving: everything that does not depend on the user is
computed once, and a user's score for an item is the inner product of a query and the item's
vector, so the item vectors go into an inner-product index.

:class:`ServingModel` serves ACF: the catalogue's reduced components and item vectors
(:mod:`service.model.tables`) replace the raw C-dimensional features, and a request reads its
profile items' rows and runs the two attentions over them. :class:`SequenceServing` serves
SASRec, for datasets on which it is the better model: its item vectors are its embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from service.model.acf import ACF, ITEM_ROWS, PAD, TAG_ROWS, Attended, ItemTables
from service.model.projection import Projected, Projection, RawFeatures, project
from service.model.sasrec import SASRec
from service.model.tables import ServingTables, compute_tables, table_rows
from service.model.tags import tag_rows


@dataclass(frozen=True)
class Explanation:
    """Why ``item`` scores what it does for one user."""

    profile: np.ndarray  # (L,) item indices, oldest first
    item_attention: np.ndarray  # (L,) sums to 1
    component_attention: np.ndarray | None  # (L, G, G) each sums to 1; None: not an image model
    score: float
    # per tag the model knows of the item (a model with metadata), the item attention on the
    # profile items that have it too, largest first
    tags: dict[str, float] = field(default_factory=dict)


class Serving(Protocol):
    """What :class:`~service.recommender.Recommender` needs of a served model."""

    @property
    def item_vectors(self) -> np.ndarray: ...  # (N, D') float32
    @property
    def takes_new_items(self) -> bool: ...  # whether with_items can score new items
    @property
    def reads_images(self) -> bool: ...  # whether it scores an item by its image
    @property
    def reads_users(self) -> bool: ...  # whether a known user's embedding shapes the query
    @property
    def tags(self) -> tuple[str, ...]: ...  # the metadata (genres) it reads of an item
    @property
    def projection_key(self) -> str | None: ...  # of what new items' features go through
    def project(self, features: RawFeatures) -> Projected: ...
    def queries(  # (B, D'); times (B, L): each profile item's, in seconds (any on PAD)
        self, users: np.ndarray, profiles: np.ndarray, times: np.ndarray | None = None
    ) -> np.ndarray: ...
    def explain(
        self, user: int, profile: Sequence[int], item: int, times: Sequence[int] | None = None
    ) -> Explanation: ...
    def with_items(
        self, features: RawFeatures | Projected, tags: Sequence[Iterable[str]] | None = None
    ) -> Serving: ...


# A new item starts from the embedding rows of its ``NEIGHBOURS`` nearest trained items: their
# mean direction, a multiple of their mean length. Nearest by image (the image vector), or, for
# a model with metadata and an item with tags it knows, by mapped tags. Chosen on the cold-item
# protocol's validation (ml100k, seed 0; README):
# - by image, the plan's ACF: the plain mean of 10 is shorter than any trained row and showed
#   new items 0.01x as often as users chose them (buried); 10 at 1.5x showed them 1.25x and
#   ranked them better among themselves than 2 at 1x (nDCG@20 0.1250 against 0.1095);
# - by tags, ACF with genres and titles: nDCG@20 0.2573 among themselves against 0.1659 by
#   image, and 10 at 1x showed them 1.57x (0.8x: 1.00x, 1.2x: 2.12x; 20 neighbours ranked
#   them lower, 0.2487).
NEIGHBOURS = 10
NEW_ITEM_LENGTH = 1.5  # by image
NEW_ITEM_LENGTH_BY_TAGS = 1.0


def _start_rows(neighbours: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(M, k, D) the neighbours' rows of each new item -> (M, D) their mean; an embedding's
    (``scale``: (M, 1)) rescaled to ``scale`` times their mean length (None: a bias, which
    stays their mean)."""
    mean = neighbours.mean(1)
    if scale is None:
        return mean
    length = neighbours.norm(dim=-1).mean(1, keepdim=True)
    return F.normalize(mean, dim=-1) * length * scale


def _nearest(new: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """(M, k) the ``NEIGHBOURS`` rows of ``trained`` (items 1..N) closest (cosine) to each of
    ``new``'s, as item indices."""
    similar = F.normalize(new, dim=1) @ F.normalize(trained, dim=1).T
    return similar.topk(min(NEIGHBOURS, similar.shape[1]), dim=1).indices + 1


class ServingModel:
    """The model, without its raw features, over its :class:`ServingTables`.

    ``projection``: what raw features go through before the model (from the checkpoint), for
    the images of items added while serving. A new item (:meth:`with_items`) is scored and
    explained from its image: its image vector and components come from its features, and its
    embedding rows (collaborative part, bias) start as the mean of those of the ``NEIGHBOURS``
    trained items whose image vectors are closest to its own (cosine), each embedding row
    rescaled to ``NEW_ITEM_LENGTH`` times its neighbours' mean length. Zero rows would rank it
    below every trained item of its kind, which all carry a learned share of the kind in their
    embeddings; its visual neighbours' mean places it among them, and the rescaling keeps it
    from being buried (a mean of several rows is shorter than each of them). A model with
    metadata also reads a new item's tags (genres, title words) as it reads a trained item's,
    and finds the neighbours of an item with tags it knows by their mapped tags instead
    (``NEW_ITEM_LENGTH_BY_TAGS``): on real data they place a new item far better than its
    image does (README)."""

    def __init__(
        self,
        model: ACF,
        tables: ServingTables,
        *,
        device: torch.device,
        projection: Projection | None = None,
        trained: int | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tables = tables
        self.device = device
        self.projection = projection
        self.grid = math.isqrt(model.config.n_components)
        # items 1..trained were trained; a new item's neighbours are among them only, so
        # items added one by one are placed as those added together are
        self.trained = model.config.n_items if trained is None else trained

    @classmethod
    def from_model(
        cls,
        model: ACF,
        *,
        device: torch.device,
        projection: Projection | None = None,
        dtype: np.dtype | type = np.float16,
    ) -> ServingModel:
        """Serve a model that holds its (projected) features; they are dropped once its
        tables are computed (``dtype``: of the components; float32 serves exactly as the model
        ranks, float16 takes half the memory)."""
        tables = compute_tables(model, model.features[1:].cpu(), dtype=dtype)
        model.features = model.pooled = torch.empty(0)
        return cls(model, tables, device=device, projection=projection)

    @property
    def item_vectors(self) -> np.ndarray:
        """(N, D') float32: the inner product of a query with an item's row is its score."""
        return self.tables.vectors

    @property
    def reads_images(self) -> bool:
        return self.model.config.visual == "score"

    @property
    def takes_new_items(self) -> bool:
        """From their image, or, for a model that scores no images, from their genres."""
        return self.model.takes_new_items

    @property
    def reads_users(self) -> bool:
        return self.model.config.users

    @property
    def tags(self) -> tuple[str, ...]:
        return self.model.config.tags

    @property
    def projection_key(self) -> str | None:
        """None for a model that takes raw features as they are."""
        return None if self.projection is None else self.projection.key

    def project(self, features: RawFeatures) -> Projected:
        """Raw (M, K, C) features through this model's projection (ValueError without one)."""
        if self.projection is None:
            raise ValueError("this model takes raw features as they are: nothing to project")
        return Projected(self.projection.key, project(features, self.projection))

    def with_items(
        self, features: RawFeatures | Projected, tags: Sequence[Iterable[str]] | None = None
    ) -> ServingModel:
        """A new serving model whose catalogue also holds items N+1..N+M with these raw
        (M, K, C) features (or rows already projected by this model's projection) and, for a
        model with metadata, these tags (e.g. genre names; none known when not given) (see the
        class doc). Raises ValueError when the model can score them neither by their image nor
        by their tags. This one is left as it is (requests in flight keep it)."""
        projected = project(features, self.projection).to(self.device)
        model, n = self.model, self.model.config.n_items
        with torch.inference_mode():
            known = tag_rows(model.config.tags, tags or [()] * len(projected)).to(self.device)
            by_tags = self._placed_by_tags(known)
            near = self._neighbours(projected, known, by_tags)  # (M, k) trained items
            scale = torch.where(by_tags, NEW_ITEM_LENGTH_BY_TAGS, NEW_ITEM_LENGTH)[:, None]
            state = model.state_dict()
            rows = {
                name: _start_rows(state[name][near], None if name == "bias.weight" else scale)
                for name in ITEM_ROWS
                if name in state
            }
            if model.config.tags:
                rows[TAG_ROWS] = known
            grown = model.with_new_items(rows)
        reduced, vectors, _ = table_rows(
            grown, projected.cpu(), first=n + 1, dtype=self.tables.reduced.dtype
        )
        tables = ServingTables(
            self.tables.reduced.append(reduced),
            np.concatenate([self.tables.vectors, vectors]),
            self.tables.images,  # new items' neighbours are trained items only
        )
        return ServingModel(
            grown, tables, device=self.device, projection=self.projection, trained=self.trained
        )

    def _placed_by_tags(self, tags: torch.Tensor) -> torch.Tensor:
        """(M,) bool: which new items (their (M, T) tag rows) are placed by their tags, those
        with a tag the model knows, where the model reads metadata; the rest by their image.
        Raises ValueError for an item the model can place neither way."""
        model = self.model
        by_tags = (
            tags.any(1)
            if model.tag_embedding is not None
            else torch.zeros(len(tags), dtype=torch.bool, device=tags.device)
        )
        if model.config.visual != "score" and not bool(by_tags.all()):
            if model.tag_embedding is None:
                raise ValueError(
                    f"a model with visual={model.config.visual!r} and no metadata scores items "
                    "by their trained embedding only; it cannot score new items"
                )
            raise ValueError(
                "this model places a new item by its metadata alone (it scores no images): "
                "give each new item at least one genre or title word it knows"
            )
        return by_tags

    def _neighbours(
        self, projected: torch.Tensor, tags: torch.Tensor, by_tags: torch.Tensor
    ) -> torch.Tensor:
        """(M, k) the ``NEIGHBOURS`` trained items closest (cosine) to each new item: by mapped
        tags where ``by_tags``, by image vector elsewhere."""
        model, n = self.model, self.trained
        near = torch.empty(len(tags), min(NEIGHBOURS, n), dtype=torch.long, device=self.device)
        if bool(by_tags.any()):
            assert model.tag_embedding is not None
            new = model.tag_embedding(tags[by_tags])
            near[by_tags] = _nearest(new, model.tag_embedding(model.item_tags[1 : n + 1]))
        if not bool(by_tags.all()):
            assert self.tables.images is not None
            new = model.image_vectors(projected[~by_tags])
            images = torch.as_tensor(np.asarray(self.tables.images, dtype=np.float32))
            near[~by_tags] = _nearest(new, images.to(self.device))
        return near

    @torch.inference_mode()
    def attend(
        self, users: np.ndarray, profiles: np.ndarray, times: np.ndarray | None = None
    ) -> Attended:
        """users (B,) (``UNKNOWN_USER`` allowed), profiles (B, L) PAD-filled item indices,
        times (B, L) when each came, in seconds (a model with ages needs them)."""
        profiles = np.asarray(profiles, dtype=np.int64)
        u = torch.as_tensor(users, dtype=torch.long, device=self.device)
        p = torch.as_tensor(profiles, device=self.device)
        t = None if times is None else torch.as_tensor(times, dtype=torch.long, device=self.device)
        items, inverse = np.unique(profiles, return_inverse=True)  # only these rows are read
        x = torch.as_tensor(self.tables.reduced.take(items), device=self.device).float()
        rows = torch.as_tensor(inverse.reshape(profiles.shape), device=self.device)
        return self.model.attend(u, p, ItemTables(x, self.model.comp_key(x)), rows, t)

    def queries(
        self, users: np.ndarray, profiles: np.ndarray, times: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, D') float32 vectors whose inner product with ``item_vectors`` is the score."""
        user = self.attend(users, profiles, times).user
        return self.model.query_vectors(user).float().cpu().numpy()

    def explain(
        self, user: int, profile: Sequence[int], item: int, times: Sequence[int] | None = None
    ) -> Explanation:
        """Both attentions behind ``item``'s score for a user with this profile (``times``:
        of its items, as :meth:`attend` takes them)."""
        slots = np.asarray(profile, dtype=np.int64)
        kept = slots != PAD
        items, n = slots[kept], int(kept.sum())

        def batch(values: Sequence[int]) -> np.ndarray:  # one row; an empty profile: one PAD
            row = np.asarray(values, dtype=np.int64)[kept]
            return row[None, :] if n else np.zeros((1, 1), np.int64)

        out = self.attend(np.array([user]), batch(profile), None if times is None else batch(times))
        query = self.model.query_vectors(out.user).float().cpu().numpy()[0]
        attention = out.item_attention[0, :n].float().cpu().numpy()
        return Explanation(
            profile=items,
            item_attention=attention,
            component_attention=out.component_attention[0, :n]
            .float()
            .cpu()
            .numpy()
            .reshape(n, self.grid, self.grid),
            score=float(query @ self.item_vectors[item - 1]),
            tags=self._shared_tags(items, attention, item),
        )

    def _shared_tags(
        self, profile: np.ndarray, attention: np.ndarray, item: int
    ) -> dict[str, float]:
        """Per tag the model knows of ``item``, the attention on the profile items that have
        it too, largest first ({} for a model without metadata)."""
        model = self.model
        if not model.config.tags:
            return {}
        read = torch.as_tensor(np.append(profile, item), device=model.item_tags.device)
        rows = (model.item_tags[read] > 0).cpu().numpy()  # (L + 1, T): the profile, the item
        shares = attention @ rows[:-1]
        own = np.flatnonzero(rows[-1])
        ranked = sorted(own, key=lambda t: -shares[t])
        return {model.config.tags[t]: float(shares[t]) for t in ranked}


class SequenceServing:
    """SASRec served: the query is the hidden state at the newest profile item, the item
    vectors its (input and output) item embeddings. It reads no images, so it neither scores new
    items nor has component attention to explain; ``/explain`` gives what its query read of
    the profile (the last block's attention of the newest position)."""

    takes_new_items = False
    reads_images = False
    reads_users = False  # a known user with no profile gets the popular items
    tags: tuple[str, ...] = ()

    def __init__(self, model: SASRec, *, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device
        with torch.inference_mode():
            self._vectors = model.item_vectors().float().cpu().numpy()

    @property
    def item_vectors(self) -> np.ndarray:
        return self._vectors

    projection_key = None  # it reads no images

    def project(self, features: RawFeatures) -> Projected:
        raise ValueError("this model (SASRec) reads no images")

    def with_items(
        self, features: RawFeatures | Projected, tags: Sequence[Iterable[str]] | None = None
    ) -> SequenceServing:
        raise ValueError(
            "this model (SASRec) ranks items by their trained embeddings and reads no images, "
            "so it cannot score items it was not trained on: serve an ACF checkpoint to add them"
        )

    @torch.inference_mode()
    def queries(
        self, users: np.ndarray, profiles: np.ndarray, times: np.ndarray | None = None
    ) -> np.ndarray:
        p = torch.as_tensor(np.asarray(profiles, dtype=np.int64), device=self.device)
        return self.model.queries(torch.empty(0), p).float().cpu().numpy()

    @torch.inference_mode()
    def explain(
        self, user: int, profile: Sequence[int], item: int, times: Sequence[int] | None = None
    ) -> Explanation:
        items = np.array([i for i in profile if i != PAD], dtype=np.int64)
        row = torch.as_tensor(items if len(items) else np.array([PAD]), device=self.device)[None]
        query = self.model.queries(torch.empty(0), row).float().cpu().numpy()[0]
        weights = self.model.newest_attention(row)[0, row.shape[1] - len(items) :]
        return Explanation(
            profile=items,
            item_attention=weights.float().cpu().numpy(),
            component_attention=None,
            score=float(query @ self._vectors[item - 1]),
        )
