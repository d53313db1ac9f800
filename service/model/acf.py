"""Attentive Collaborative Filtering (Chen et al., SIGIR 2017) on image components.

The VisRec tutorial's PyTorch reimplementation is ``visual="attention"``; the paper's options it
dropped (the ``W1v v_l`` term, untied ``v``/``p``) are available in :class:`ACFConfig`, and so is
this project's variant (``visual="score"``), in which the attended image content reaches the
score instead of only shaping the item-level weights.

Notation (B users, L profile items, K components, C feature dim, D model dim, A attention dim):
- component attention ``b(i,l,m) = w2ᵀ ReLU(W2u u_i + W2x x_lm + b2) + c2``, softmax over K;
  ``x̄(i,l) = Σ_m β(i,l,m) x_lm``;
- item attention ``a(i,l) = w1ᵀ ReLU(W1u u_i + W1p p_l [+ W1v v_l] + W1x x̄(i,l) [+ r_pos]
  [+ W1n c_newest] + b1) + c1``, masked softmax over the profile; ``r_pos`` (``recency``) is a
  learned vector per position counted back from the newest item, and ``W1n c_newest``
  (``newest``) lets the weights depend on the newest item, so a new interest that shows up in
  the profile can draw the weight onto the items that share it; ``[+ r_age]`` (``ages``) is a
  learned vector per bucket of how long before the profile's newest item the item came
  (:data:`AGE_EDGES_S`), so an item of an earlier visit weighs as its age says, whatever its
  position;
- user vector ``u_i + Σ_l α(i,l) c_l`` with ``c_l = p_l`` (``visual="attention"``, the tutorial)
  or ``c_l = p_l + x̄(i,l)`` (``visual="score"``);
- order inside the profile (``context_blocks`` > 0): before the item attention, the profile's
  ``c_l`` plus a learned vector per position (counted from the oldest item) go through
  causal self-attention blocks (:mod:`service.model.blocks`, as in SASRec), and the item
  attention weighs and pools the contextualised ``c'_l`` (its ``W1p`` reads ``c'_l`` instead of
  ``p_l``): ``α(i,l)`` is then the weight of profile item ``l`` *after* context, which is what
  ``/explain`` shows;
- ``users=False``: no user embedding (``u_i = 0``), the vector comes from the profile alone;
- metadata (``tags``: e.g. a film's genres) as a second content channel: an item's tags, a
  row of weights summing to 1 over the tag vocabulary, map to ``g_j = W_g t_j``, added to the
  item's embedding on both sides (``p_l + g_l`` in the profile, ``v_j + g_j`` as a candidate),
  so an item added after training is placed by its tags as well as by its image;
- item vector ``v_j`` or, with ``visual="score"``, ``v_j + x̃_j`` where ``x̃_j`` pools the item's
  reduced components: their mean, or (``item_pool="attention"``) ``Σ_m γ(j,m) x_jm`` with ``γ``
  the component attention of a zero user, taken as constant (no gradient), so a candidate is
  scored by the part of its image the attention picks out; score
  ``scale · (user · item) [+ b_j]``.

With ``visual="score"`` the gradient of the score reaches the component attention directly, so
looking at the part of an image that predicts preference is rewarded; with
``visual="attention"`` the image only re-weights profile items, and nothing rewards attending to
the object (measured: the attention then sits on image corners). ``visual="none"`` is the
ablation without images. An item with no trained embedding (a new item: zero rows) still has a
vector from its image under ``visual="score"``.

Everything that does not depend on the user (the reduced components ``x`` and their attention
keys ``W2x x + b2``) is computed once per distinct item in :meth:`ACF.encode_items`, so a batch
of users never touches raw C-dimensional features more than once per item.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.blocks import Block, causal_blocked, positions_back, positions_forward

PAD = 0  # item index 0 is padding; real items are 1..N
# Bucket edges, in seconds, of a profile item's age: how long before the profile's newest item
# it came (a minute, 10 minutes, an hour, a day, a week, 30 days). On ml100k the items of
# training windows that came within a minute of the one after them share its raters (cosine
# .37) more than those a month before it at the same position (.24): the age says what the
# position does not.
AGE_EDGES_S = (60, 600, 3600, 86_400, 7 * 86_400, 30 * 86_400)
UNKNOWN_USER = -1  # user index of someone the model has no embedding for

Visual = Literal["attention", "score", "none"]


@dataclass(frozen=True)
class ACFConfig:
    n_users: int
    n_items: int
    feature_dim: int
    n_components: int = 49
    dim: int = 64
    attention_dim: int = 64
    tied: bool = True  # v = p, as in the tutorial
    item_term: bool = False  # the paper's W1v v_l term in the item attention
    item_bias: bool = False
    component_pool: Literal["attention", "mean"] = "attention"  # "mean": ablation
    # How an item's own image vector x̃ pools its components (``visual="score"``): their mean,
    # or the component attention a user the model knows nothing of gives them (zero query)
    item_pool: Literal["mean", "attention"] = "mean"
    visual: Visual = "attention"  # where the image acts; "attention" is the tutorial's ACF
    recency: int = 0  # > 0: learned recency vectors for this many newest profile positions
    newest: bool = False  # the item attention also asks how each item relates to the newest
    score_scale: float | None = None  # None: 1 / dim, as in the tutorial
    users: bool = True  # a learned embedding per user; False: the profile alone
    context_blocks: int = 0  # > 0: causal self-attention blocks over the profile (see above)
    heads: int = 1  # of those blocks
    dropout: float = 0.0  # in those blocks (training only)
    positions: int = 9  # position vectors of the context blocks (the newest this many)
    tags: tuple[str, ...] = ()  # the metadata vocabulary (e.g. genres); () : no metadata
    ages: bool = False  # the item attention reads each item's age (see r_age above)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))  # a checkpoint stores a list

    @property
    def scale(self) -> float:
        return 1.0 / self.dim if self.score_scale is None else self.score_scale


@dataclass(frozen=True)
class ItemTables:
    """Per-item, user-independent tensors; row 0 is the padding item."""

    reduced: Tensor  # (M, K, D) reduced components x
    keys: Tensor  # (M, K, A) W2x x + b2


@dataclass(frozen=True)
class Attended:
    user: Tensor  # (B, D) user vector
    item_attention: Tensor  # (B, L) sums to 1 over real profile items, 0 on padding
    component_attention: Tensor  # (B, L, K) sums to 1 per real profile item, 0 on padding


class Context(nn.Module):
    """Causal self-attention over a profile's content vectors: (B, L, D) -> (B, L, D), each
    real slot contextualised by the real items at or before it, padding left at zero."""

    def __init__(self, dim: int, blocks: int, heads: int, dropout: float, positions: int) -> None:
        super().__init__()
        self.position = nn.Embedding(positions, dim)  # counted from the oldest item
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.heads = heads
        nn.init.zeros_(self.position.weight)  # starts order-blind, as ACF's recency

    def forward(self, content: Tensor, mask: Tensor) -> Tensor:
        real = mask.unsqueeze(-1)
        x = content + self.position(positions_forward(mask, self.position.num_embeddings))
        x = self.dropout(x) * real
        blocked = causal_blocked(mask, self.heads)
        for block in self.blocks:
            x = block(x, blocked) * real
        return self.norm(x) * real


class ACF(nn.Module):
    """ACF with the item features held as a (non-persistent) buffer.

    ``features``: (N, K, C) component features of items 1..N, any float dtype; None for a
    model that is only given tables (:meth:`with_new_items`). ``tags``: (N, T) the items'
    rows of :func:`service.model.tags.tag_rows` over ``config.tags`` (a buffer saved with
    the weights).
    """

    features: Tensor  # (N+1, K, C) float32 buffer, row 0 = padding
    pooled: Tensor  # (N+1, C) mean over K of ``features``
    item_tags: Tensor  # (N+1, T) float32, row 0 = padding; only with metadata

    def __init__(
        self, config: ACFConfig, features: Tensor | None, tags: Tensor | None = None
    ) -> None:
        super().__init__()
        k, c = config.n_components, config.feature_dim
        if features is not None and tuple(features.shape) != (config.n_items, k, c):
            raise ValueError(
                f"features have shape {tuple(features.shape)}, the model expects "
                f"{(config.n_items, k, c)}"
            )
        self.config = config
        d, a = config.dim, config.attention_dim
        padded = (  # (N+1, K, C), or no rows at all
            torch.empty(0, k, c)
            if features is None
            else torch.cat([torch.zeros(1, k, c), features.float()])
        )
        self.register_buffer("features", padded, persistent=False)
        self.register_buffer("pooled", padded.mean(1), persistent=False)
        t = len(config.tags)
        if tags is not None and tuple(tags.shape) != (config.n_items, t):
            raise ValueError(f"tags have shape {tuple(tags.shape)}, expected {(config.n_items, t)}")
        if t:
            rows = torch.zeros(config.n_items, t) if tags is None else tags.float()
            self.register_buffer(TAG_ROWS, torch.cat([torch.zeros(1, t), rows]))
        self.user_embedding = nn.Embedding(config.n_users, d) if config.users else None
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=PAD)  # v
        self.profile_embedding = (  # p
            self.item_embedding
            if config.tied
            else nn.Embedding(config.n_items + 1, d, padding_idx=PAD)
        )
        self.reduce = nn.Linear(c, d)
        self.comp_user = nn.Linear(d, a, bias=False)  # W2u
        self.comp_key = nn.Linear(d, a)  # W2x, b2
        self.comp_out = nn.Linear(a, 1)  # w2, c2
        self.item_user = nn.Linear(d, a, bias=False)  # W1u
        self.item_profile = nn.Linear(d, a)  # W1p, b1
        self.item_component = nn.Linear(d, a, bias=False)  # W1x
        self.item_self = nn.Linear(d, a, bias=False) if config.item_term else None  # W1v
        self.recency = nn.Embedding(config.recency, a) if config.recency else None  # r_pos
        self.item_newest = nn.Linear(d, a, bias=False) if config.newest else None  # W1n
        self.age = nn.Embedding(len(AGE_EDGES_S) + 1, a) if config.ages else None  # r_age
        self.item_out = nn.Linear(a, 1)  # w1, c1
        self.tag_embedding = nn.Linear(t, d, bias=False) if t else None  # W_g
        self.bias = (
            nn.Embedding(config.n_items + 1, 1, padding_idx=PAD) if config.item_bias else None
        )
        self._init_weights()
        self.context = (  # PyTorch's initialisation, as SASRec's blocks
            Context(d, config.context_blocks, config.heads, config.dropout, config.positions)
            if config.context_blocks
            else None
        )

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for emb in (self.item_embedding, self.profile_embedding):
                emb.weight[PAD].zero_()
            if self.bias is not None:
                self.bias.weight.zero_()
            for table in (self.recency, self.age):
                if table is not None:
                    table.weight.zero_()  # starts order-blind, as the tutorial's model

    @property
    def uses_images(self) -> bool:
        return self.config.visual != "none"

    @property
    def takes_new_items(self) -> bool:
        """Whether it can score an item it was not trained on: by the image (``visual="score"``)
        or by the item's tags."""
        return self.config.visual == "score" or bool(self.config.tags)

    @property
    def _mean_images(self) -> bool:
        """Items' own image vectors are means (so is every pooling of the mean-pool ablation)."""
        return "mean" in (self.config.item_pool, self.config.component_pool)

    # --- user-independent part -------------------------------------------------------------
    def encode_items(self, features: Tensor) -> ItemTables:
        """Features (M, K, C) -> reduced components and their attention keys."""
        x = self.reduce(features)  # (M, K, D)
        return ItemTables(reduced=x, keys=self.comp_key(x))

    def catalogue_tables(self) -> ItemTables:
        """Tables for the whole catalogue, row = item index (row 0 = padding)."""
        return self.encode_items(self.features)

    # --- user-dependent part ---------------------------------------------------------------
    def attend(
        self,
        users: Tensor,
        profiles: Tensor,
        tables: ItemTables,
        rows: Tensor | None = None,
        times: Tensor | None = None,
    ) -> Attended:
        """User vectors with both attentions.

        users (B,) (``UNKNOWN_USER`` allowed), profiles (B, L) item indices with PAD for empty
        slots, oldest first; ``rows`` (B, L) are the rows of ``tables`` holding each profile
        item (default: the item index); ``times`` (B, L) when each came, in seconds (a model
        with ``ages`` needs them; any value on PAD).
        """
        mask = profiles != PAD  # (B, L)
        t = self._profile_terms(users, profiles, tables, profiles if rows is None else rows)
        h = t.keys
        if self.recency is not None:
            h = h + self.recency(positions_back(mask, self.config.recency))
        if self.item_newest is not None:
            h = h + self.item_newest(_newest(t.content, mask)).unsqueeze(1)
        if self.age is not None:
            times = self._times(times, mask)
            newest = times.gather(1, _last_real(mask)[:, -1:])  # (B, 1): the newest item's
            h = h + self.age(age_buckets(newest - times))
        alpha = _masked_softmax(self.item_out(F.relu(h)).squeeze(-1), mask)  # (B, L)
        user = t.user + (alpha.unsqueeze(-2) @ t.content).squeeze(-2)  # (B, D)
        return Attended(user, alpha, t.component_attention * mask.unsqueeze(-1))

    def attend_every_position(
        self, users: Tensor, rows: Tensor, times: Tensor | None = None
    ) -> Tensor:
        """(B,) users, (B, L) consecutive items of each (oldest first, PAD on the left) and
        their ``times`` (as :meth:`attend` takes them) -> (B, L, D) the user vector after each
        position: position t's is :meth:`attend`'s for the profile ``rows[:, :t+1]``, all of
        them from one pass over the row (training on every position, as SASRec is): the context
        blocks read the row causally with positions counted from its oldest item, and the item
        attention's recency and ages count back from t.
        """
        items, index = torch.unique(rows, return_inverse=True)
        tables = self.encode_items(self.features[items]) if self.uses_images else _NO_TABLES
        mask = rows != PAD  # (B, L)
        t = self._profile_terms(users, rows, tables, index)
        content, length = t.content, rows.shape[1]
        h = t.keys.unsqueeze(1).expand(-1, length, -1, -1)  # (B, T, L, A): item l seen from t
        if self.recency is not None:  # real items after l up to t, wherever padding is
            count = mask.long().cumsum(-1)  # (B, L)
            back = (count.unsqueeze(2) - count.unsqueeze(1)).clamp(0, self.config.recency - 1)
            h = h + self.recency(back)  # (B, T, L, A)
        if self.item_newest is not None:  # window t's newest: its last real item
            last = _last_real(mask)  # (B, T)
            newest = content.gather(1, last.unsqueeze(-1).expand_as(content))
            newest = newest * (mask.long().cumsum(-1) > 0).unsqueeze(-1)
            h = h + self.item_newest(newest).unsqueeze(2)
        if self.age is not None:  # item l's age seen from window t's newest item
            times = self._times(times, mask)
            newest_time = times.gather(1, _last_real(mask))  # (B, T)
            h = h + self.age(age_buckets(newest_time.unsqueeze(2) - times.unsqueeze(1)))
        seen = torch.ones(length, length, dtype=torch.bool, device=rows.device).tril()
        visible = seen & mask.unsqueeze(1)  # (B, T, L)
        alpha = _masked_softmax(self.item_out(F.relu(h)).squeeze(-1), visible)
        return t.user.unsqueeze(1) + alpha @ content  # (B, T, D)

    def _profile_terms(
        self, users: Tensor, profiles: Tensor, tables: ItemTables, rows: Tensor
    ) -> _ProfileTerms:
        """What both attentions' callers share: the user embeddings, each slot's component
        attention, its content (contextualised with context blocks) and the part of its item
        attention logit's input that does not depend on which slot is the newest."""
        mask = profiles != PAD
        u = self.user_vectors(users)  # (B, D)
        p = self.profile_embedding(profiles)  # (B, L, D)
        if self.tag_embedding is not None:
            p = p + self.tag_embedding(self.item_tags[profiles])
        if self.uses_images:
            beta, x_bar = self._pool_components(users, u, tables, rows)  # (B, L, K), (B, L, D)
        else:
            beta, x_bar = p.new_zeros(*profiles.shape, self.config.n_components), None
        content = p + x_bar if self.config.visual == "score" and x_bar is not None else p
        if self.context is not None:
            content = self.context(content, mask)
        keyed = p if self.context is None else content
        h = self.item_user(u).unsqueeze(1) + self.item_profile(keyed)  # (B, L, A)
        if x_bar is not None:
            h = h + self.item_component(x_bar)
        if self.item_self is not None:
            h = h + self.item_self(self.item_embedding(profiles))
        return _ProfileTerms(u, beta, content, h)

    def _times(self, times: Tensor | None, mask: Tensor) -> Tensor:
        if times is None or times.shape != mask.shape:
            raise ValueError(
                "this ACF reads how long before the newest profile item each one came "
                f"(ages): give the profile's times, shape {tuple(mask.shape)}"
            )
        return times.long()

    def user_vectors(self, users: Tensor) -> Tensor:
        """(B,) user indices -> (B, D) embeddings; ``UNKNOWN_USER`` (a user the model was not
        trained on) gets a zero vector, so their vector comes from their profile alone."""
        if self.user_embedding is None:
            return self.reduce.weight.new_zeros(len(users), self.config.dim)
        known = users != UNKNOWN_USER
        u = self.user_embedding(users.clamp(min=0))
        return u * known.unsqueeze(-1)

    def _pool_components(
        self, users: Tensor, u: Tensor, tables: ItemTables, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Component attention and pooled components ``x̄`` of every profile slot.

        Both depend only on the (user, item) pair, so each distinct pair in the batch is
        computed once: when a batch holds consecutive samples of a user, whose profiles are
        sliding windows over the same items, this is several times less work than per slot.
        Returns beta (B, L, K) and x̄ (B, L, D).
        """
        b, l_ = rows.shape
        pair_keys = (users[:, None] + 1) * len(tables.reduced) + rows  # (B, L); users >= -1
        _, inverse = torch.unique(pair_keys, return_inverse=True)  # (B, L) -> 0..P-1
        slots = torch.arange(b * l_, device=rows.device)
        first = torch.full((int(inverse.max()) + 1,), b * l_, device=rows.device)
        first = first.scatter_reduce(0, inverse.flatten(), slots, reduce="amin")  # (P,)
        pair_rows, pair_u = rows.flatten()[first], u[first // l_]  # (P,), (P, D)
        x = tables.reduced.index_select(0, pair_rows)  # (P, K, D)
        if self.config.component_pool == "mean":
            beta = x.new_full(x.shape[:2], 1.0 / x.shape[1])  # (P, K)
        else:
            query = self.comp_user(pair_u)[:, None, :]  # (P, 1, A)
            keys = tables.keys.index_select(0, pair_rows)  # (P, K, A)
            beta = torch.softmax(self.comp_out(F.relu(keys + query)).squeeze(-1), dim=-1)
        x_bar = (beta.unsqueeze(1) @ x).squeeze(1)  # (P, D)
        slot_pairs = inverse.flatten()  # index_select: its backward is a fast index_add
        return (
            beta.index_select(0, slot_pairs).view(b, l_, -1),
            x_bar.index_select(0, slot_pairs).view(b, l_, -1),
        )

    # --- scoring ---------------------------------------------------------------------------
    def item_vectors(self, items: Tensor | None = None, *, hidden: Tensor | None = None) -> Tensor:
        """(M, D[+1]) vectors of ``items`` (default: all of 1..N, in order) such that
        ``query_vectors(user) @ item_vectors().T`` is the model's score.

        Under ``visual="score"`` an item's vector is its embedding plus its image vector x̃
        (its reduced components pooled as ``item_pool`` says), so an item is also scored by
        what it shows. ``hidden`` (N+1,) bool, training only: items whose embedding is left
        out (item-id dropout)."""
        if items is None:
            items = torch.arange(1, self.config.n_items + 1, device=self.pooled.device)
        if self.config.visual != "score":
            return self.vectors_with_image(items, None, hidden)
        if self._mean_images:  # mean of reduced = reduced of mean
            return self.vectors_with_image(items, self.reduce(self.pooled[items]), hidden)
        return self.vectors_with_image(items, self._images(self.features[items]), hidden)

    def vectors_with_image(
        self, items: Tensor, image: Tensor | None, hidden: Tensor | None = None
    ) -> Tensor:
        """Item vectors from the items' embedding rows (those ``hidden`` says left out) and the
        given (M, D) image vectors."""
        v = self.item_embedding(items)  # (M, D)
        if hidden is not None:
            v = v.masked_fill(hidden[items].unsqueeze(-1), 0.0)
        if self.tag_embedding is not None:
            v = v + self.tag_embedding(self.item_tags[items])
        if image is not None:
            v = v + image
        v = v * self.config.scale
        return v if self.bias is None else torch.cat([v, self.bias(items)], dim=1)

    def image_vectors(self, features: Tensor) -> Tensor:
        """(M, K, C) component features -> x̃ (M, D), as :meth:`item_vectors` adds them. Only a
        ``visual="score"`` model scores with it, so only it can score an item it was not
        trained on (ValueError otherwise)."""
        if self.config.visual != "score":
            raise ValueError(
                f"a model with visual={self.config.visual!r} scores items by their trained "
                "embedding only; it cannot score new items from their images"
            )
        return self._images(features.float())

    def _images(self, features: Tensor) -> Tensor:
        """(M, K, C) -> x̃ (M, D). The weights are constants, and the reduction is linear with
        weights summing to 1, so it reduces the pooled features: the gradient reaches
        ``reduce`` through M rows, not M x K."""
        if self._mean_images:  # no components to reduce for weights known in advance
            return self.reduce(features.mean(1))
        with torch.no_grad():
            weights = self.image_weights(self.reduce(features))  # (M, K)
        return self.reduce((weights.unsqueeze(1) @ features).squeeze(1))

    def image_weights(self, reduced: Tensor) -> Tensor:
        """(M, K, D) reduced components -> (M, K) the weights x̃ pools them with (see
        ``item_pool``)."""
        if self._mean_images:
            return reduced.new_full(reduced.shape[:2], 1.0 / reduced.shape[1])
        keys = self.comp_key(reduced)  # the query of a zero user is zero
        return torch.softmax(self.comp_out(F.relu(keys)).squeeze(-1), dim=-1)

    def with_new_items(self, rows: Mapping[str, Tensor]) -> ACF:
        """The same model for a catalogue of N + M items, the new ones (N+1..) starting from the
        given embedding rows (``rows[name]``: (M, ...) for each of the model's
        ``ITEM_ROWS`` it has; zeros where missing). It holds no features: its tables come from
        :meth:`encode_items`."""
        count = len(next(iter(rows.values())))
        grown = ACF(replace(self.config, n_items=self.config.n_items + count), None)
        state = self.state_dict()
        for name in (*ITEM_ROWS, TAG_ROWS):
            if name in state:
                new = rows.get(name, state[name].new_zeros(count, *state[name].shape[1:]))
                state[name] = torch.cat([state[name], new.to(state[name])])
        grown.load_state_dict(state)
        return grown.to(self.reduce.weight.device).eval()

    def without_users(self) -> ACF:
        """A copy that reads no user embedding: every user's vector comes from their profile
        alone, as an ``UNKNOWN_USER``'s does (``users=False``)."""
        clone = copy.deepcopy(self)
        clone.config = replace(self.config, users=False)
        clone.user_embedding = None
        return clone

    def query_vectors(self, user: Tensor) -> Tensor:
        """(B, D) user vectors -> (B, D[+1]) inner-product queries."""
        if self.bias is None:
            return user
        return torch.cat([user, user.new_ones(len(user), 1)], dim=1)

    def attend_profiles(
        self, users: Tensor, profiles: Tensor, times: Tensor | None = None
    ) -> Attended:
        """:meth:`attend` with tables of the batch's distinct profile items only, so the cost
        does not grow with the catalogue."""
        items, rows = torch.unique(profiles, return_inverse=True)
        tables = self.encode_items(self.features[items]) if self.uses_images else _NO_TABLES
        return self.attend(users, profiles, tables, rows, times)

    def queries(self, users: Tensor, profiles: Tensor, times: Tensor | None = None) -> Tensor:
        """(B,) users, (B, L) profiles (and their times) -> (B, D[+1]) inner-product queries."""
        return self.query_vectors(self.attend_profiles(users, profiles, times).user)

    def score_all(self, users: Tensor, profiles: Tensor, times: Tensor | None = None) -> Tensor:
        """(B, N) scores of items 1..N."""
        return self.queries(users, profiles, times) @ self.item_vectors().T


@dataclass(frozen=True)
class _ProfileTerms:
    user: Tensor  # (B, D) user embeddings
    component_attention: Tensor  # (B, L, K)
    content: Tensor  # (B, L, D) what the item attention pools
    keys: Tensor  # (B, L, A) item attention logits' input before recency and the newest item


_NO_TABLES = ItemTables(torch.empty(0), torch.empty(0))
# parameters with one row per item (row 0 = PAD); a tied model has the first two the same
ITEM_ROWS = ("item_embedding.weight", "profile_embedding.weight", "bias.weight")
TAG_ROWS = "item_tags"  # the items' metadata: given for a new item, not learned


def age_buckets(ages: Tensor) -> Tensor:
    """Ages in seconds (any shape) -> their buckets 0..len(AGE_EDGES_S) (negative: 0)."""
    edges = torch.tensor(AGE_EDGES_S, dtype=ages.dtype, device=ages.device)
    return torch.bucketize(ages, edges, right=True)


def _last_real(mask: Tensor) -> Tensor:
    """(B, L) -> (B, L): the slot of the last real item at or before each slot (0 if none)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).cummax(-1).values


def _newest(content: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) -> (B, D) the newest real item's row (zeros for an empty profile)."""
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
    rows = content[torch.arange(len(content), device=content.device), last]
    return rows * mask.any(-1, keepdim=True)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; all-masked rows give zeros (no NaN)."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1) * mask
