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

from service.model.acf import ACF, PAD, Attended, ItemTables


@dataclass(frozen=True)
class Explanation:
    """Why ``item`` scores what it does for one user."""

    profile: np.ndarray  # (L,) item indices, oldest first
    item_attention: np.ndarray  # (L,) sums to 1
    component_attention: np.ndarray  # (L, G, G) each sums to 1 (G x G grid over the image)
    score: float


class ServingModel:
    def __init__(self, model: ACF, *, device: torch.device) -> None:
        model = model.to(device).eval()
        with torch.inference_mode():
            self.tables: ItemTables = model.catalogue_tables()
            self.item_vectors = model.item_vectors().float().cpu().numpy()  # (N, D')
        model.features = torch.empty(0, device=device)  # raw features are not needed any more
        self.model = model
        self.device = device
        self.grid = math.isqrt(model.config.n_components)

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
