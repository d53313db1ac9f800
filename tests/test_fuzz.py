"""Schemathesis fuzzes every operation of the service's own OpenAPI schema, in process.

Each operation gets the coverage phase (boundary values and invalid inputs: wrong types, values
out of range, missing fields or API key, unexpected methods) and Hypothesis-generated cases,
valid and invalid. Every answer must not be a 5xx, must have a documented status and content
type, and its body must match the schema; invalid input must be refused and valid input accepted.
``pytest -s`` prints how many requests were generated, per operation and status.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
import torch
from fastapi import FastAPI
from hypothesis import strategies as st

from service.api.app import create_app
from service.config import Settings
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint

CONFIG = TrainConfig(dim=16, attention_dim=16, epochs=2, batch_size=128, lr=1e-2)
# An admin key, which may call everything; sent as X-API-Key except where the fuzzer leaves it out.
API_KEY = "fuzz-key-0123456789abcdef"
MAX_EXAMPLES = 20  # Hypothesis cases per operation, on top of the coverage phase's
MIN_REQUESTS = 400  # fewer means operations were skipped or next to nothing was generated

FUZZER_CONFIG = {
    # derandomized, so CI runs the same requests every time
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
    "checks": {
        # A schema cannot say which item ids exist (or which files a reload can read): a valid
        # request may get 422 for them. `valid_requests_pass_validation` below checks that such a
        # 422 is never a validation error. Nor which event ids were used: 409.
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "404", "409", "422", "429"]
        },
    },
}


@pytest.fixture(scope="module", params=[True, False], ids=["reads-need-a-key", "reads-open"])
def app(
    request: pytest.FixtureRequest,
    world: World,
    world_features: tuple[Path, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> FastAPI:
    prepared = prepare(world.root, world_features[0])
    result = fit(prepared, CONFIG, device=torch.device("cpu"), progress=False)
    ckpt = tmp_path_factory.mktemp("fuzz") / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, CONFIG))
    settings = Settings(
        checkpoint=ckpt,
        features=world_features[0],
        device="cpu",
        data=world.root,  # the catalogue, so /items/{item_id}/image serves real files
        admin_keys=API_KEY,
        auth_reads=request.param,  # either way the schema must say what is checked
        rate_limit_per_s=0,  # the fuzzer is one fast caller
        auth_failures_per_s=0,  # that sends many wrong keys on purpose
    )
    return create_app(settings, profiles=histories(load_dataset(world.root)))


@pytest.fixture(scope="module")
def api_schema(app: FastAPI, world: World) -> schemathesis.BaseSchema:
    # Schemathesis's ASGI client starts the app's lifespan (model, index, store) with the first
    # request, and its pytest plugin ends it after the test.
    config = schemathesis.Config.from_dict(FUZZER_CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    # Random integers are seldom ids of the catalogue's items, and a request naming one unknown
    # item is refused before the model sees it: half of the generated requests name known items
    # instead, so the model's paths (explain, apply interactions) are fuzzed too.
    known = load_dataset(world.root).item_ids.tolist()

    def half_known(value: Any) -> st.SearchStrategy[Any]:
        return st.sampled_from([value, _known_items(value, known)])

    for part in ("body", "query", "path_parameters"):
        schema.hook(f"flatmap_{part}")(lambda _, value: half_known(value))
    return schema


def _known_items(value: Any, known: list[int], key: str | None = None) -> Any:
    """``value`` with every integer item id (``item_id``, ``history``) mapped to a known one."""
    if isinstance(value, Mapping):
        return {k: _known_items(v, known, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_known_items(v, known, key) for v in value]
    if key in ("item_id", "history") and isinstance(value, int) and not isinstance(value, bool):
        return known[value % len(known)]
    return value


@pytest.fixture
def ledger(api_schema: schemathesis.BaseSchema) -> Iterator[Counter[tuple[str, int]]]:
    """(operation, status) of every generated request; checked once the whole fuzz has run."""
    in_schema = {
        operation.label for methods in api_schema.values() for operation in methods.values()
    }
    sent: Counter[tuple[str, int]] = Counter()
    started = time.perf_counter()
    yield sent
    took = time.perf_counter() - started
    operations = sorted({op for op, _ in sent})
    print(
        f"\nschemathesis {schemathesis.__version__}: {sent.total()} generated requests "
        f"over {len(operations)} operations in {took:.1f} s"
    )
    for op in operations:
        statuses = {status: n for (o, status), n in sorted(sent.items()) if o == op}
        print(f"  {op}: {sum(statuses.values())} requests, by status {statuses}")
    assert set(operations) == in_schema
    assert sent.total() >= MIN_REQUESTS


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's `from_fixture` reads `Item._nodeid`, which pytest 9.2 no longer has
    # (it keeps `nodeid` only); without it every lazily loaded schema test fails at once.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _ints(value: Any) -> set[int]:
    """Every integer in a request's body or query: the item ids it names, and then some."""
    if isinstance(value, str):  # a query value
        with contextlib.suppress(ValueError):
            return {int(value)}
        return set()
    if isinstance(value, bool):
        return set()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {int(value)}
    if isinstance(value, Mapping):
        return _ints(list(value.values()))
    if isinstance(value, Sequence):
        return set().union(*map(_ints, value))
    return set()


def valid_requests_pass_validation(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """The service validates as its schema says: a schema-valid request is never answered with
    field errors (but for ``timestamps`` of another length than ``history``, which a schema
    cannot say), and one refused for unknown items names only item ids it was sent."""
    valid = case.meta is not None and case.meta.generation.mode.is_positive
    if not valid or response.status_code != 422:
        return None
    body = response.json()
    if isinstance(body["detail"], list):  # field errors: only what a schema cannot say
        unsaid = [e for e in body["detail"] if "times for" not in e["msg"]]
        assert not unsaid, f"a schema-valid request was refused: {body}"
        return True
    unknown = set(body.get("unknown_item_ids", []))
    named = _ints(case.body) | _ints(case.query)
    assert unknown <= named, f"{unknown} are not among the request's item ids {named}"
    return True


schema = schemathesis.pytest.from_fixture("api_schema")
TINY_PNG = bytes.fromhex(  # an 8x8 black PNG
    "89504e470d0a1a0a0000000d49484452000000080000000808020000004b6d29dc0000000c49444154"
    "789c6360181e000000c80001ad4076220000000049454e44ae426082"
)


@schema.parametrize()
def test_every_operation_answers_by_its_schema(
    case: schemathesis.Case, ledger: Counter[tuple[str, int]]
) -> None:
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.operation.label == "POST /items" and positive and isinstance(case.body, dict):
        # The schema cannot say "bytes that decode as an image": random bytes are refused
        # with 415 by design. Schema-valid cases get a real image; the other fields stay fuzzed.
        case.body["image"] = TINY_PNG
    response = case.call()
    ledger[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, additional_checks=[valid_requests_pass_validation])


UNKNOWN = 424242  # no item has this id
# What the fuzzer found answered against the schema: each answer must now be the documented one.
FOUND = [
    ("POST", "/recommend", {"body": {"history": [1, UNKNOWN]}}, 422),
    ("POST", "/interactions", {"body": {"events": [{"user_id": "u", "item_id": UNKNOWN}]}}, 422),
    (
        "GET",
        "/explain/{user_id}",
        {"path_parameters": {"user_id": "1"}, "query": {"item_id": UNKNOWN}},
        422,
    ),
    ("POST", "/explain", {"body": {"history": [1], "item_id": UNKNOWN}}, 422),
    ("POST", "/recommend", {"body": {"history": [1, 2], "timestamps": [0.0]}}, 422),
    ("POST", "/recommend", {"body": {"history": [1, 2], "timestamps": [0, 1.5]}}, 200),
    ("GET", "/items/{item_id}", {"path_parameters": {"item_id": UNKNOWN}}, 404),
    ("GET", "/items/{item_id}/image", {"path_parameters": {"item_id": UNKNOWN}}, 404),
    # JSON types are not coerced: 0 is not false, "5" is not an item id; 3.0 is an integer
    ("POST", "/recommend", {"body": {"history": [], "exclude_seen": 0}}, 422),
    ("POST", "/interactions", {"body": {"events": [{"user_id": "u", "item_id": "5"}]}}, 422),
    ("POST", "/explain", {"body": {"history": ["1"], "item_id": 2}}, 422),
    ("POST", "/recommend", {"body": {"history": [1.0, 2], "k": 3.0}}, 200),
    (
        "POST",
        "/interactions",
        {"body": {"events": [{"user_id": "u", "item_id": 1}]}, "key": "no"},
        401,
    ),
    # a body that is not UTF-8 cannot be read as JSON at all
    ("POST", "/interactions", {"body": b"\xff{}", "media_type": "application/json"}, 400),
    ("POST", "/admin/reload", {"body": b"\xff{}", "media_type": "application/json"}, 400),
]


@pytest.mark.parametrize(("method", "path", "request_", "status"), FOUND)
def test_what_the_fuzzer_found_is_answered_as_documented(
    api_schema: schemathesis.BaseSchema,
    method: str,
    path: str,
    request_: dict[str, Any],
    status: int,
) -> None:
    kwargs = dict(request_)
    headers = {"X-API-Key": kwargs.pop("key", API_KEY)}
    case = api_schema[path][method].Case(headers=headers, **kwargs)
    response = case.call()
    assert response.status_code == status
    case.validate_response(response)
