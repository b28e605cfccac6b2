"""The API's self-description, health and error shape."""

from __future__ import annotations


def test_openapi_document_describes_every_route(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    assert {"/auth/signup", "/auth/signin", "/peers", "/sessions/start", "/sessions", "/sessions/training-status",
            "/sessions/{session_id}", "/sessions/{session_id}/heartbeats", "/sessions/{session_id}/events",
            "/healthz"} <= paths
    detail = spec["paths"]["/sessions/{session_id}"]["get"]
    assert "304" in detail["responses"] and any(p.get("name") == "If-None-Match" or "IF_NONE_MATCH" in str(p)
                                                for p in detail["parameters"])
    assert "text/event-stream" in spec["paths"]["/sessions/{session_id}/events"]["get"]["responses"]["200"]["content"]
    start = spec["paths"]["/sessions/start"]["post"]
    form = start["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "num_peers", "hyperparameters"} <= set(_properties(spec, form))
    assert "400" in start["responses"] and "202" in start["responses"]


def _properties(spec, schema):
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    props = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        props.update(_properties(spec, part))
    return props


def test_docs_page_is_served(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert b"swagger" in response.data.lower()


def test_health_reports_each_service(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"ok": True, "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_unknown_routes_and_methods_use_the_error_shape(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert set(response.json) == {"code", "status", "message"}
    response = client.delete("/auth/signup")
    assert response.status_code == 405
    assert response.json["status"] == "Method Not Allowed"
    assert "POST" in response.headers["Allow"].split(", ") and "DELETE" not in response.headers["Allow"]
    response = client.post("/sessions/training-status", headers={"Authorization": "Bearer x"})
    assert response.status_code == 405 and "GET" in response.headers["Allow"]


def test_a_session_route_allows_only_its_own_methods(client):
    # /sessions/start is not a session id: GET on it is not allowed, rather than a search for session "start".
    response = client.get("/sessions/start")
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert client.get("/sessions/not-an-id").status_code == 404


def test_a_malformed_json_body_is_400(client):
    response = client.post("/auth/signup", data="{", content_type="application/json")
    assert response.status_code == 400
    assert response.json["code"] == 400


def test_health_names_the_failing_check_but_never_its_exception_text(app, caplog):
    from celery import Celery

    from webapp.extensions import DISPATCHER, Dispatcher

    # A real broker connection to a port nothing listens on.
    unreachable = Celery("unreachable", broker="amqp://guest:guest@127.0.0.1:1//")
    unreachable.conf.broker_connection_timeout = 1
    app.extensions[DISPATCHER] = Dispatcher(unreachable, "coordinator")
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.json == {"ok": False, "checks": {"database": "ok", "broker": "unavailable", "storage": "ok"}}
    assert "Connection refused" in caplog.text or "111" in caplog.text  # the reason is in the log instead
