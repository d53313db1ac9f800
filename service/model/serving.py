"""ACF prepared for serving: everything that does not depend on the user is computed once.

At start-up the catalogue's reduced components and attention keys are computed (the raw
C-dimensional features are then dropped), and the item vectors are exported for an
inner-product index. A request only runs the two attentions over its profile items.
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


@dataclass(frozen=True)
class Explanation:
    """Why ``item`` scores what it does for one user."""

    profile: np.ndarray  # (L,) item indices, oldest first
    item_attention: np.ndarray  # (L,) sums to 1
    component_attention: np.ndarray  # (L, G, G) each sums to 1 (G x G grid over the image)
    score: float


NEIGHBOURS = 10  # trained items whose embeddings a new item starts from


class ServingModel:
    """``projection``: what raw features go through before the model (from the checkpoint),
    for the images of items added while serving.

    A new item (:meth:`with_items`) is scored and explained from its image: its image vector
    and components come from its features, and its embedding rows (collaborative part, bias)
    start as the mean of those of the ``NEIGHBOURS`` trained items whose image vectors are
    closest to its own (cosine). Zero rows would rank it below every trained item of its kind,
    which all carry a learned share of the kind in their embeddings; its visual neighbours'
    mean places it among them."""

    def __init__(
        self, model: ACF, *, device: torch.device, projection: Projection | None = None
    ) -> None:
        model = model.to(device).eval()
        with torch.inference_mode():
            tables = model.catalogue_tables()
            vectors = model.item_vectors().float().cpu().numpy()  # (N, D')
            items = torch.arange(1, model.config.n_items + 1, device=device)
            images = (
                F.normalize(model.image_vectors(model.features[items]), dim=1)
                if model.config.visual == "score"
                else None
            )
        # the features are not needed any more: only the tables and vectors are
        model.features = model.pooled = torch.empty(0, device=device)
        self._set(model, tables, vectors, images, device=device, projection=projection)

    def _set(
        self,
        model: ACF,
        tables: ItemTables,
        vectors: np.ndarray,
        images: torch.Tensor | None,
        *,
        device: torch.device,
        projection: Projection | None,
    ) -> None:
        self.model = model
        self.tables = tables
        self.item_vectors = vectors
        self.trained_images = images  # (N_trained, D) unit image vectors: neighbours of new items
        self.device = device
        self.projection = projection
        self.grid = math.isqrt(model.config.n_components)

    def with_items(self, features: np.ndarray) -> ServingModel:
        """A new serving model whose catalogue also holds items N+1..N+M with these raw
        (M, K, C) features (see the class doc). Raises ValueError when the model cannot score
        items from their images. This one is left as it is (requests in flight keep it)."""
        projected = project(features, self.projection).to(self.device)
        model, n = self.model, self.model.config.n_items
        with torch.inference_mode():
            image = model.image_vectors(projected)  # (M, D); ValueError for other models
            assert self.trained_images is not None
            similar = F.normalize(image, dim=1) @ self.trained_images.T  # (M, N_trained)
            near = similar.topk(min(NEIGHBOURS, similar.shape[1]), dim=1).indices + 1  # (M, k)
            state = model.state_dict()
            rows = {name: state[name][near].mean(1) for name in ITEM_ROWS if name in state}
            grown = model.with_new_items(rows)
            new = torch.arange(n + 1, n + len(projected) + 1, device=self.device)
            added = grown.encode_items(projected)
            vectors = grown.vectors_with_image(new, image).float().cpu().numpy()
        out = ServingModel.__new__(ServingModel)
        out._set(
            grown,
            ItemTables(
                torch.cat([self.tables.reduced, added.reduced]),
                torch.cat([self.tables.keys, added.keys]),
            ),
            np.concatenate([self.item_vectors, vectors]),
            self.trained_images,
            device=self.device,
            projection=self.projection,
        )
        return out

    @torch.inference_mode()
    def attend(self, users: np.ndarray, profiles: np.ndarray) -> Attended:
        """users (B,) (``UNKNOWN_USER`` allowed), profiles (B, L) PAD-filled item indices."""
        u = torch.as_tensor(users, dtype=torch.long, device=self.device)
        p = torch.as_tensor(profiles, dtype=torch.long, device=self.device)
        return self.model.attend(u, p, self.tables)

    def queries(self, users: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        """(B, D') float32 vectors whose inner product with ``item_vectors`` is the score."""
        user = self.attend(users, profiles).user
        return self.model.query_vectors(user).float().cpu().numpy()

    def explain(self, user: int, profile: Sequence[int], item: int) -> Explanation:
        """Both attentions behind ``item``'s score for a user with this profile."""
        items = np.array([i for i in profile if i != PAD], dtype=np.int64)
        out = self.attend(np.array([user]), items[None, :] if len(items) else np.zeros((1, 1)))
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
