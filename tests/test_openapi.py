"""The OpenAPI document describes every route, and schemathesis finds no 5xx and no answer off the schema."""
from __future__ import annotations

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from conftest import tiny_model_config
from serve.app import create_app
from serve.config import build_config


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    import torch

    from conftest import tiny_net

    folder = tmp_path_factory.mktemp("openapi")
    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    app = create_app(build_config({"models": [tiny_model_config(folder / "tiny.pth")],
                                   "server": {"max_upload_bytes": 200_000}}))
    yield app
    app.extensions["serve"].close()


def documented_and_served(app) -> tuple[set[str], set[str]]:
    document = app.test_client().get("/openapi.json").json
    assert document["openapi"].startswith("3.")
    served = {f"{method} {rule.rule.replace('<name>', '{name}').replace('<version>', '{version}')}"
              for rule in app.url_map.iter_rules() if "<path:" not in rule.rule  # the page's static files
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {f"{method.upper()} {path}" for path, methods in document["paths"].items() for method in methods}
    return documented, served


def test_document_lists_every_route(live_app):
    documented, served = documented_and_served(live_app)
    assert documented == served
    assert "POST /models/{name}/reload" not in documented  # not served unless management is on


def test_document_lists_reload_where_management_is_on(make_app):
    documented, served = documented_and_served(make_app(enable_management=True))
    assert documented == served and "POST /models/{name}/reload" in documented


@pytest.mark.slow
def test_api_conforms_to_its_schema(live_app):
    """Every operation, fuzzed by schemathesis: no 5xx, every answer in its documented shape and status."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", live_app)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            # A schema can't say "a decodable image": random bytes that fit it are rightly a 400.
            excluded = [positive_data_acceptance] if case.method == "POST" or case.method == "PUT" else []
            if "X-Request-Timeout-Ms" in (case.headers or {}):
                excluded.append(not_a_server_error)  # a deadline of a few ms is rightly a 503 (documented)
            if case.path.endswith(":explain"):
                excluded.append(not_a_server_error)  # KServe V1's explain: 501, no explainer (documented)
            case.call_and_validate(excluded_checks=excluded)

        check()
        checked.append(operation.label)
    document = live_app.test_client().get("/openapi.json").json
    documented = {f"{method.upper()} {path}" for path, methods in document["paths"].items() for method in methods}
    assert set(checked) == documented - {"GET /openapi.json"}  # schemathesis leaves out the schema's own URL
