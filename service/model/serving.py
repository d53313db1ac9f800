"""ACF prepared for serving: everything that does not depend on the user is computed once.

The catalogue's reduced components and item vectors (:mod:`service.model.tables`) replace the
raw C-dimensional features; the vectors go into an inner-product index. A request reads its
profile items' rows and runs the two attentions over them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from service.model.acf import ACF, ITEM_ROWS, PAD, Attended, ItemTables
from service.model.projection import Projection, project
from service.model.tables import ServingTables, compute_tables, table_rows


@dataclass(frozen=True)
class Explanation:
    """Why ``item`` scores what it does for one user."""

    profile: np.ndarray  # (L,) item indices, oldest first
    item_attention: np.ndarray  # (L,) sums to 1
    component_attention: np.ndarray  # (L, G, G) each sums to 1 (G x G grid over the image)
    score: float


NEIGHBOURS = 10  # trained items whose embeddings a new item starts from


class ServingModel:
    """The model, without its raw features, over its :class:`ServingTables`.

    ``projection``: what raw features go through before the model (from the checkpoint), for
    the images of items added while serving. A new item (:meth:`with_items`) is scored and
    explained from its image: its image vector and components come from its features, and its
    embedding rows (collaborative part, bias) start as the mean of those of the ``NEIGHBOURS``
    trained items whose image vectors are closest to its own (cosine). Zero rows would rank it
    below every trained item of its kind, which all carry a learned share of the kind in their
    embeddings; its visual neighbours' mean places it among them."""

    def __init__(
        self,
        model: ACF,
        tables: ServingTables,
        *,
        device: torch.device,
        projection: Projection | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tables = tables
        self.device = device
        self.projection = projection
        self.grid = math.isqrt(model.config.n_components)

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

    def with_items(self, features: np.ndarray) -> ServingModel:
        """A new serving model whose catalogue also holds items N+1..N+M with these raw
        (M, K, C) features (see the class doc). Raises ValueError when the model cannot score
        items from their images. This one is left as it is (requests in flight keep it)."""
        projected = project(features, self.projection).to(self.device)
        model, n = self.model, self.model.config.n_items
        with torch.inference_mode():
            image = model.image_vectors(projected)  # (M, D); ValueError for other models
            assert self.tables.images is not None
            trained = torch.as_tensor(np.asarray(self.tables.images, dtype=np.float32))
            similar = F.normalize(image, dim=1) @ trained.to(self.device).T  # (M, N_trained)
            near = similar.topk(min(NEIGHBOURS, similar.shape[1]), dim=1).indices + 1  # (M, k)
            state = model.state_dict()
            rows = {name: state[name][near].mean(1) for name in ITEM_ROWS if name in state}
            grown = model.with_new_items(rows)
        reduced, vectors, _ = table_rows(
            grown, projected.cpu(), first=n + 1, dtype=self.tables.reduced.dtype
        )
        tables = ServingTables(
            self.tables.reduced.append(reduced),
            np.concatenate([self.tables.vectors, vectors]),
            self.tables.images,  # new items' neighbours are trained items only
        )
        return ServingModel(grown, tables, device=self.device, projection=self.projection)

    @torch.inference_mode()
    def attend(self, users: np.ndarray, profiles: np.ndarray) -> Attended:
        """users (B,) (``UNKNOWN_USER`` allowed), profiles (B, L) PAD-filled item indices."""
        profiles = np.asarray(profiles, dtype=np.int64)
        u = torch.as_tensor(users, dtype=torch.long, device=self.device)
        p = torch.as_tensor(profiles, device=self.device)
        items, inverse = np.unique(profiles, return_inverse=True)  # only these rows are read
        x = torch.as_tensor(self.tables.reduced.take(items), device=self.device).float()
        rows = torch.as_tensor(inverse.reshape(profiles.shape), device=self.device)
        return self.model.attend(u, p, ItemTables(x, self.model.comp_key(x)), rows)

    def queries(self, users: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        """(B, D') float32 vectors whose inner product with ``item_vectors`` is the score."""
        user = self.attend(users, profiles).user
        return self.model.query_vectors(user).float().cpu().numpy()

    def explain(self, user: int, profile: Sequence[int], item: int) -> Explanation:
        """Both attentions behind ``item``'s score for a user with this profile."""
        items = np.array([i for i in profile if i != PAD], dtype=np.int64)
        out = self.attend(
            np.array([user]), items[None, :] if len(items) else np.zeros((1, 1), np.int64)
        )
        query = self.model.query_vectors(out.user).float().cpu().numpy()[0]
        n = len(items)
        return Explanation(
            profile=items,
            item_attention=out.item_attention[0, :n].float().cpu().numpy(),
            component_attention=out.component_attention[0, :n]
            .float()
            .cpu()
            .numpy()
            .reshape(n, self.grid, self.grid),
            score=float(query @ self.item_vectors[item - 1]),
        )
