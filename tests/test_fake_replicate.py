"""The fake Replicate server against the real, unmodified replicate 1.0.7 client (real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["REPLICATE_POLL_INTERVAL"] = "0.05"  # read when replicate is imported

import httpx
import orjson
import pydantic.v1
import pytest
import uvicorn
from PIL import Image
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput

from fake_replicate.cli import build_config, build_settings
from fake_replicate.config import FakeConfig
from fake_replicate.directives import AmbiguousCreate, CreateFault, GetFault, Outage, parse_directives
from fake_replicate.inputs import model_version_id, parse_cancel_after
from fake_replicate.responses import ConnectionDropped
from fake_replicate.server import create_app

MODEL = "acme/stand-in"  # the generic stand-in: the per-model behaviour is pinned in test_fake_models.py
ID_RE = re.compile(r"^[a-z2-7]{26}$")
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
AUTH = {"Authorization": "Bearer test"}


@dataclass
class LiveServer:
    base_url: str

    def client(self, **kwargs: Any) -> Client:
        return Client(api_token="test", base_url=self.base_url, **kwargs)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.base_url}/_fake/stats").json()
        return data


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    app = create_app(FakeConfig(latency=0.3, seed=1))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield LiveServer(f"http://127.0.0.1:{port}")
    uv.should_exit = True
    thread.join(5)
    sock.close()


@pytest.fixture
def client(server: LiveServer) -> Client:
    return server.client()


def unique(text: str = "a red fox") -> str:
    return f"{text} {uuid.uuid4().hex[:10]}"


def poll(client: Client, prediction_id: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        prediction = client.predictions.get(prediction_id)
        if prediction.status in ("succeeded", "failed", "canceled"):
            return prediction
        assert time.monotonic() < deadline, f"still {prediction.status}"
        time.sleep(0.05)


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image.size


# --------------------------------------------------------------------------- happy paths


def test_create_poll_and_download(client: Client) -> None:
    prompt = unique()
    input_ = {"prompt": prompt, "width": 320, "height": 200, "num_outputs": 2, "seed": 7, "extra": 1}
    created = client.predictions.create(model=MODEL, input=input_)
    assert ID_RE.match(created.id)
    assert created.status == "starting"
    assert created.model == MODEL and created.output is None
    assert created.input == input_
    assert created.urls is not None and created.urls["get"].endswith(f"/v1/predictions/{created.id}")

    done = poll(client, created.id)
    assert done.status == "succeeded"
    assert done.error is None and done.metrics is not None and done.metrics["predict_time"] > 0
    assert done.completed_at is not None and ISO_RE.match(done.completed_at)
    assert done.started_at is not None and ISO_RE.match(done.started_at)
    assert done.progress is not None and done.progress.percentage == 1.0
    assert isinstance(done.output, list) and len(done.output) == 2
    bodies = []
    for url in done.output:
        assert isinstance(url, str) and url.startswith("http://")
        response = httpx.get(url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert int(response.headers["content-length"]) == len(response.content)
        assert png_size(response.content) == (320, 200)
        bodies.append(response.content)
    assert bodies[0] != bodies[1]


def test_status_moves_through_processing(client: Client) -> None:
    prompt = unique("[[latency=0.6]]")
    created = client.predictions.create(model=MODEL, input={"prompt": prompt, "width": 64, "height": 64})
    seen = {created.status}
    while True:
        prediction = client.predictions.get(created.id)
        seen.add(prediction.status)
        if prediction.status == "succeeded":
            break
        time.sleep(0.03)
    assert seen == {"starting", "processing", "succeeded"}


def test_run_end_to_end(client: Client) -> None:
    prompt = unique()
    output = client.run(MODEL, input={"prompt": prompt, "width": 64, "height": 48})
    assert isinstance(output, list) and len(output) == 1
    assert isinstance(output[0], str)  # http: outputs stay plain str in replicate 1.0.7
    assert png_size(httpx.get(output[0]).content) == (64, 48)
    # wait=False switches run() to polling.
    polled = client.run(MODEL, input={"prompt": prompt, "width": 32, "height": 32}, wait=False)
    assert isinstance(polled, list) and len(polled) == 1


def test_prefer_wait(server: LiveServer, client: Client) -> None:
    # NB: client.predictions.create(model=..., wait=5) silently drops `wait` in replicate 1.0.7;
    # client.models.predictions.create passes it on (Prefer: wait=5).
    done = client.models.predictions.create(MODEL, input={"prompt": unique(), "width": 16}, wait=5)
    assert done.status == "succeeded" and done.output

    prompt = unique("[[latency=5]]")
    started = time.monotonic()
    response = httpx.post(
        f"{server.base_url}/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": prompt}},
        headers={**AUTH, "Prefer": "wait=1"},
    )
    assert 0.9 < time.monotonic() - started < 3
    assert response.status_code == 201
    assert response.headers["preference-applied"] == "wait"
    body = response.json()
    assert body["status"] == "starting" and body["output"] is None
    assert response.headers["location"] == body["urls"]["get"]
    client.predictions.cancel(body["id"])


def test_data_output_mode_directive(client: Client) -> None:
    prompt = unique("[[output:data]] [[latency=0]]")
    output = client.run(MODEL, input={"prompt": prompt, "width": 40, "height": 30})
    assert isinstance(output, list) and isinstance(output[0], FileOutput)
    assert output[0].url.startswith("data:image/png;base64,")
    assert png_size(output[0].read()) == (40, 30)
    assert png_size(base64.b64decode(output[0].url.split(",", 1)[1])) == (40, 30)


def test_version_and_deployment_routes(client: Client) -> None:
    version_id = model_version_id(MODEL)
    created = client.predictions.create(version=version_id, input={"prompt": unique(), "width": 16})
    assert created.version == version_id and created.model == MODEL
    assert poll(client, created.id).status == "succeeded"

    version = client.models.get(MODEL).versions.get("abc123")
    assert version.id == "abc123" and version.cog_version == "0.9.0"
    assert version.openapi_schema["components"]["schemas"]["Output"]["type"] == "array"

    # run() with owner/name:version creates on /v1/predictions and then GETs the version.
    output = client.run(f"acme/other:{'f' * 64}", input={"prompt": unique(), "width": 8, "height": 8})
    assert isinstance(output, list) and len(output) == 1

    deployed = client.predictions.create(deployment="acme/my-deployment", input={"prompt": unique()})
    assert deployed.model == "acme/my-deployment"

    secret = client.webhooks.default.secret()
    assert secret.key is not None and secret.key.startswith("whsec_")


def test_list_newest_first(server: LiveServer, client: Client) -> None:
    ids = [client.predictions.create(model=MODEL, input={"prompt": unique()}).id for _ in range(3)]
    page = client.predictions.list()
    listed = [p.id for p in page.results]
    assert listed[:3] == ids[::-1]
    # The client's Prediction model drops `source` and `data_removed`; check the raw JSON.
    raw = httpx.get(f"{server.base_url}/v1/predictions", headers=AUTH).json()["results"][0]
    assert raw["id"] == ids[-1] and raw["source"] == "api" and raw["data_removed"] is False


def test_cancel(client: Client) -> None:
    created = client.predictions.create(model=MODEL, input={"prompt": unique("[[latency=10]]")})
    canceled = client.predictions.cancel(created.id)
    assert canceled.status == "canceled" and canceled.output is None
    assert canceled.completed_at is not None
    assert client.predictions.get(created.id).status == "canceled"
    assert client.predictions.cancel(created.id).status == "canceled"

    finished = client.predictions.create(model=MODEL, input={"prompt": unique("[[latency=0]]")})
    assert finished.status == "succeeded"
    again = client.predictions.cancel(finished.id)
    assert again.status == "succeeded" and again.output == finished.output


@pytest.mark.asyncio
async def test_async_api(server: LiveServer) -> None:
    client = server.client()
    created = await client.predictions.async_create(model=MODEL, input={"prompt": unique(), "width": 24})
    assert created.status == "starting"
    for _ in range(200):
        prediction = await client.predictions.async_get(created.id)
        if prediction.status == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert prediction.status == "succeeded" and prediction.output
    output = await client.async_run(MODEL, input={"prompt": unique(), "width": 8, "height": 8})
    assert isinstance(output, list) and len(output) == 1
    canceled = await client.predictions.async_cancel(
        (await client.predictions.async_create(model=MODEL, input={"prompt": unique("[[latency=9]]")})).id
    )
    assert canceled.status == "canceled"
    await client._async_client.aclose()


# --------------------------------------------------------------------------- errors and directives


def test_invalid_input_422(server: LiveServer, client: Client) -> None:
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model=MODEL, input={"prompt": unique("[[invalid]]")})
    assert info.value.status == 422 and info.value.title == "Input validation failed"

    response = httpx.post(
        f"{server.base_url}/v1/models/{MODEL}/predictions",
        json={"input": {"width": "wide", "num_outputs": 9}},
        headers=AUTH,
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    fields_ = {f["field"] for f in response.json()["invalid_fields"]}
    assert fields_ == {"input", "input.width", "input.num_outputs"}


def test_create_500_once_then_success(server: LiveServer, client: Client) -> None:
    prompt = unique("[[create:500*1]]")
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert info.value.status == 500
    assert server.stats()["by_prompt"].get(prompt) is None
    created = client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert created.status == "starting"
    assert server.stats()["by_prompt"][prompt] == 1


def test_create_502_has_a_gateway_body(client: Client) -> None:
    prompt = unique("[[create:502*1]]")
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert info.value.status == 502 and info.value.title is None


def test_create_429_with_retry_after(server: LiveServer, client: Client) -> None:
    prompt = unique("[[create:429*1:retry_after=2]]")
    response = httpx.post(
        f"{server.base_url}/v1/models/{MODEL}/predictions", json={"input": {"prompt": prompt}}, headers=AUTH
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    body = response.json()
    assert body["retry_after"] == 2 and body["status"] == 429
    assert body["detail"] == "Request was throttled. Your rate limit resets in ~2s."
    assert client.predictions.create(model=MODEL, input={"prompt": prompt}).status == "starting"


def test_flagged_and_fail_n(client: Client) -> None:
    with pytest.raises(ModelError) as info:
        client.run(MODEL, input={"prompt": unique("[[flagged]] [[latency=0.1]]")})
    assert str(info.value) == "The input or output was flagged as sensitive. (E005)"
    assert info.value.prediction.status == "failed"

    prompt = unique("[[fail*1]] [[latency=0]]")
    first = client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert first.status == "failed" and first.error == "Prediction failed: the model timed out while starting (E6716)"
    assert first.output is None
    second = client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert second.status == "succeeded" and second.output


def test_get_503_directive_is_retried_by_client(server: LiveServer, client: Client) -> None:
    created = client.predictions.create(model=MODEL, input={"prompt": unique("[[get:503*2]]")})
    before = server.stats()["faults"].get("get_503", 0)
    assert client.predictions.get(created.id).id == created.id  # RetryTransport retries GET 503
    assert server.stats()["faults"]["get_503"] == before + 2


def test_output_file_directives(client: Client) -> None:
    missing = client.run(MODEL, input={"prompt": unique("[[output:404]]"), "width": 8})
    assert isinstance(missing, list)
    assert httpx.get(missing[0]).status_code == 404
    html = client.run(MODEL, input={"prompt": unique("[[output:notimage]]"), "width": 8})
    assert isinstance(html, list)
    response = httpx.get(html[0])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == "<html>"


def test_hang_create_then_reconcile_through_list(server: LiveServer, client: Client) -> None:
    prompt = unique("[[hang_create=2]]")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{server.base_url}/v1/models/{MODEL}/predictions",
            json={"input": {"prompt": prompt}},
            headers=AUTH,
            timeout=0.5,
        )
    listed = [p for p in client.predictions.list().results if p.input and p.input["prompt"] == prompt]
    assert len(listed) == 1 and listed[0].status in ("starting", "processing", "succeeded")

    # Through the client: create without `wait` has NO timeout in replicate 1.0.7 (it passes
    # timeout=None per request); with wait=N the read timeout is N + 0.5 s.
    prompt = unique("[[hang_create=2*1]]")
    with pytest.raises(httpx.ReadTimeout):
        client.models.predictions.create(MODEL, input={"prompt": prompt}, wait=1)
    again = client.models.predictions.create(MODEL, input={"prompt": prompt}, wait=1)  # no hang now
    assert again.status == "succeeded"
    assert len([p for p in client.predictions.list() if p.input and p.input["prompt"] == prompt]) == 2


def test_auth_and_not_found(server: LiveServer, client: Client) -> None:
    response = httpx.post(f"{server.base_url}/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}})
    assert response.status_code == 401
    assert response.json() == {
        "title": "Unauthenticated",
        "detail": "You did not pass an authentication token",
        "status": 401,
    }
    token = httpx.get(f"{server.base_url}/v1/predictions", headers={"Authorization": "Token test"})
    assert token.status_code == 200

    with pytest.raises(ReplicateError) as info:
        client.predictions.get("doesnotexist0000000000000a")
    assert info.value.status == 404 and info.value.detail == "Not found."
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model="missing/model", input={"prompt": unique()})
    assert info.value.status == 404


def test_put_config_changes_latency_live(server: LiveServer, client: Client) -> None:
    url = f"{server.base_url}/_fake/config"
    assert httpx.get(url).json()["latency"] == 0.3
    try:
        assert httpx.put(url, json={"latency": 0}).json()["latency"] == 0.0
        created = client.predictions.create(model=MODEL, input={"prompt": unique(), "width": 8})
        assert created.status == "succeeded" and created.output
    finally:
        httpx.put(url, json={"latency": 0.3})
    assert httpx.put(url, json={"nope": 1}).status_code == 400
    assert httpx.put(url, json={"p_create_500": 2}).status_code == 400
    assert httpx.get(url).json()["latency"] == 0.3


# --------------------------------------------------------------------------- in-process (ASGI transport)


def asgi_client(config: FakeConfig) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(config))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.mark.asyncio
async def test_global_faults_stats_and_reset() -> None:
    path = f"/v1/models/{MODEL}/predictions"
    body = {"input": {"prompt": "p"}}
    async with asgi_client(FakeConfig(latency=0, seed=3, p_create_500=1.0)) as tc:
        assert (await tc.post(path, json=body, headers=AUTH)).status_code == 500
        await tc.put("/_fake/config", json={"p_create_500": 0, "p_create_429": 1, "retry_after": 3})
        throttled = await tc.post(path, json=body, headers=AUTH)
        assert throttled.status_code == 429 and throttled.headers["retry-after"] == "3"
        await tc.put("/_fake/config", json={"p_create_429": 0, "p_flagged": 1})
        flagged = (await tc.post(path, json=body, headers=AUTH)).json()
        assert flagged["status"] == "failed" and "(E005)" in flagged["error"]
        await tc.put("/_fake/config", json={"p_flagged": 0, "p_model_error": 1})
        oom = (await tc.post(path, json=body, headers=AUTH)).json()
        assert oom["status"] == "failed" and "(E001)" in oom["error"]
        await tc.put("/_fake/config", json={"p_model_error": 0, "p_get_503": 1, "output_mode": "data"})
        assert (await tc.get(f"/v1/predictions/{oom['id']}", headers=AUTH)).status_code == 503
        small = {"input": {"prompt": "q", "width": 4, "height": 4}}
        ok = (await tc.post(path, json=small, headers=AUTH)).json()
        assert ok["status"] == "succeeded" and ok["output"][0].startswith("data:image/png;base64,")

        stats = (await tc.get("/_fake/stats")).json()
        assert stats["creates"] == 5 and stats["predictions"] == 3
        assert stats["by_prompt"] == {"p": 2, "q": 1}
        assert stats["statuses"] == {"failed": 2, "succeeded": 1}
        assert (await tc.post("/_fake/reset")).status_code == 200
        stats = (await tc.get("/_fake/stats")).json()
        assert (stats["creates"], stats["predictions"], stats["by_prompt"]) == (0, 0, {})


@pytest.mark.asyncio
async def test_pagination_and_api_token() -> None:
    good = {"Authorization": "Token secret"}
    async with asgi_client(FakeConfig(latency=0, api_token="secret")) as tc:
        bad = await tc.get("/v1/predictions", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["title"] == "Unauthenticated"
        ids = []
        for i in range(105):
            body = {"version": "v1", "input": {"prompt": f"n{i}"}}
            ids.append((await tc.post("/v1/predictions", json=body, headers=good)).json()["id"])
        first = (await tc.get("/v1/predictions", headers=good)).json()
        assert [p["id"] for p in first["results"]] == ids[::-1][:100]
        assert first["next"].startswith("http://testserver/v1/predictions?cursor=") and first["previous"] is None
        second = (await tc.get(first["next"], headers=good)).json()
        assert [p["id"] for p in second["results"]] == ids[4::-1] and second["next"] is None
        assert (await tc.get(second["previous"], headers=good)).json() == first
        assert (await tc.get("/v1/predictions?cursor=5", headers=good)).status_code == 400
        no_version = await tc.post("/v1/predictions", json={"input": {"prompt": "x"}}, headers=good)
        assert no_version.status_code == 422


def test_parse_directives() -> None:
    d = parse_directives("cat [[create:429*2:retry_after=5]] [[create:503]] [[get:503*3]] [[fail*2]]")
    assert d.create_faults == (CreateFault(429, 2, 5.0), CreateFault(503, None, None))
    assert d.get_faults == (GetFault(503, 3),)
    assert d.fail and d.fail_count == 2 and not d.flagged
    d = parse_directives("[[hang_create=1.5*2]][[latency=0.25]][[output:notimage]][[flagged]][[bogus]]")
    assert (d.hang_create, d.hang_count, d.latency, d.output, d.flagged) == (1.5, 2, 0.25, "notimage", True)
    assert parse_directives("plain prompt") == parse_directives("")
    d = parse_directives("[[create_ambiguous:504*2]] [[create_ambiguous:drop]] [[outage=2.5:after=1]]")
    assert d.ambiguous_creates == (AmbiguousCreate("504", 2), AmbiguousCreate("drop", None))
    assert d.outage == Outage(2.5, 1.0) and parse_directives("[[outage=3]]").outage == Outage(3.0, None)


def test_build_config_from_flags_and_env() -> None:
    env = {"FAKE_REPLICATE_LATENCY": "0.5", "FAKE_REPLICATE_SEED": "9", "FAKE_REPLICATE_PORT": "6000"}
    config = build_config(["--p-create-500", "0.2", "--seed", "3", "--output-mode", "data"], env)
    assert (config.latency, config.p_create_500, config.seed, config.output_mode) == (0.5, 0.2, 3, "data")
    settings = build_settings(["--host", "0.0.0.0"], env)
    assert (settings.host, settings.port, settings.config.seed) == ("0.0.0.0", 6000, 9)
    assert build_config([], {}) == FakeConfig()
    with pytest.raises(SystemExit):
        build_config(["--output-mode", "ftp"], {})


# --------------------------------------------------------------------------- restarts


@pytest.mark.asyncio
async def test_predictions_outlive_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    """Given a fake with a data dir and predictions finished, running and canceled, when it restarts,
    then each is found again, a running one finishes on time, and output files are still served."""
    path = f"/v1/models/{MODEL}/predictions"

    async def create(tc: httpx.AsyncClient, prompt: str) -> dict[str, Any]:
        body = {"input": {"prompt": prompt, "width": 8, "height": 8}}
        answer: dict[str, Any] = (await tc.post(path, json=body, headers=AUTH)).json()
        return answer

    first = create_app(FakeConfig(latency=0), data_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://testserver") as tc:
        done = await create(tc, "finished")
        running = await create(tc, "running [[latency=0.6]]")
        canceled = await create(tc, "canceled [[latency=30]]")
        assert (await tc.post(f"/v1/predictions/{canceled['id']}/cancel", headers=AUTH)).json()["status"] == "canceled"
        before = (await tc.get(done["output"][0])).content
    assert running["status"] == "starting"

    second = create_app(FakeConfig(latency=0), data_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://testserver") as tc:

        async def status(prediction: dict[str, Any]) -> str:
            return str((await tc.get(f"/v1/predictions/{prediction['id']}", headers=AUTH)).json()["status"])

        assert await status(done) == "succeeded"
        assert await status(canceled) == "canceled"
        assert await status(running) in ("starting", "processing")
        await asyncio.sleep(0.7)
        assert await status(running) == "succeeded"
        after = await tc.get(done["output"][0])
        assert after.status_code == 200 and after.content == before
        stats = (await tc.get("/_fake/stats")).json()
        assert stats["predictions"] == 3 and stats["by_prompt"]["finished"] == 1
        listed = (await tc.get("/v1/predictions", headers=AUTH)).json()["results"]
        assert [p["id"] for p in listed] == [canceled["id"], running["id"], done["id"]]
        await tc.post("/_fake/reset")

    third = create_app(FakeConfig(latency=0), data_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=third), base_url="http://testserver") as tc:
        assert (await tc.get(f"/v1/predictions/{done['id']}", headers=AUTH)).status_code == 404


@pytest.mark.asyncio
async def test_without_a_data_dir_a_restart_forgets_predictions(tmp_path: Path) -> None:
    body = {"input": {"prompt": "p"}}
    async with asgi_client(FakeConfig(latency=0)) as tc:
        made = (await tc.post(f"/v1/models/{MODEL}/predictions", json=body, headers=AUTH)).json()
    async with asgi_client(FakeConfig(latency=0)) as tc:
        assert (await tc.get(f"/v1/predictions/{made['id']}", headers=AUTH)).status_code == 404


def test_data_dir_from_flag_or_env(tmp_path: Path) -> None:
    env = {"FAKE_REPLICATE_DATA_DIR": str(tmp_path / "env")}
    assert build_settings([], env).data_dir == tmp_path / "env"
    assert build_settings(["--data-dir", str(tmp_path / "flag")], env).data_dir == tmp_path / "flag"
    assert build_settings([], {}).data_dir is None


@pytest.mark.asyncio
async def test_webhooks_of_a_prediction_running_at_a_restart_are_still_sent(tmp_path: Path) -> None:
    """Given a prediction created with a webhook when the fake stops, when it starts again on the same
    data dir, then the prediction's `completed` webhook still arrives, as Replicate would send it."""
    received: list[dict[str, Any]] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        received.append(orjson.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    receiver = await asyncio.start_server(receive, "127.0.0.1", 0)
    hook = f"http://127.0.0.1:{receiver.sockets[0].getsockname()[1]}/hook"
    body = {"input": {"prompt": "webhooks outlive a restart", "width": 8, "height": 8}, "webhook": hook}
    try:
        first = create_app(FakeConfig(latency=1.0), data_dir=tmp_path)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://fake") as tc:
            made = (await tc.post(f"/v1/models/{MODEL}/predictions", json=body, headers=AUTH)).json()
        await first.state.fake.webhooks.aclose()  # the fake stops before the prediction completes
        assert all(hooked["status"] != "succeeded" for hooked in received)

        second = create_app(FakeConfig(latency=1.0), data_dir=tmp_path)
        async with second.router.lifespan_context(second):
            deadline = time.monotonic() + 10
            while not any(h["id"] == made["id"] and h["status"] == "succeeded" for h in received):
                assert time.monotonic() < deadline, "the completed webhook never came"
                await asyncio.sleep(0.05)
    finally:
        receiver.close()


# --------------------------------------------------------------------------- the list's pages


def test_the_unmodified_client_walks_the_list_page_by_page(server: LiveServer, client: Client) -> None:
    """Given pages of 2, when the client follows `next` from the first page, then it sees every prediction
    once, newest first, even though predictions are created while it walks; `previous` leads back."""
    url = f"{server.base_url}/_fake/config"
    ours = [client.predictions.create(model=MODEL, input={"prompt": unique("paged")}).id for _ in range(5)]
    httpx.put(url, json={"list_page_size": 2})
    try:
        first = client.predictions.list()
        assert [p.id for p in first.results] == ours[:2:-1] and first.previous is None
        walked = [p.id for p in first.results]
        pages = [first]
        page = first
        while page.next is not None:
            client.predictions.create(model=MODEL, input={"prompt": unique("made while walking")})
            page = client.predictions.list(page.next)
            assert len(page.results) <= 2 and page.previous is not None
            walked += [p.id for p in page.results]
            pages.append(page)
        back = client.predictions.list(pages[2].previous)
        assert [p.id for p in back.results] == [p.id for p in pages[1].results]
    finally:
        httpx.put(url, json={"list_page_size": 100})
    assert walked[:5] == ours[::-1]
    assert len(walked) == len(set(walked)) == server.stats()["predictions"] - (len(pages) - 1)


# --------------------------------------------------------------------------- ambiguous creates


def listed_with(client: Client, prompt: str) -> list[Any]:
    return [p for p in client.predictions.list().results if p.input and p.input.get("prompt") == prompt]


@pytest.mark.parametrize("status", [502, 504])
def test_an_ambiguous_create_makes_the_prediction_then_answers_a_gateway_error(
    server: LiveServer, client: Client, status: int
) -> None:
    """Given [[create_ambiguous:5xx*1]], when a create is sent, then it answers that status although the
    prediction exists, runs and is billed (GET and the list show it); the next create answers 201."""
    prompt = unique(f"[[create_ambiguous:{status}*1]]")
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model=MODEL, input={"prompt": prompt, "width": 8, "height": 8})
    assert info.value.status == status
    made = listed_with(client, prompt)
    assert len(made) == 1 and server.stats()["by_prompt"][prompt] == 1
    assert poll(client, made[0].id).status == "succeeded"
    assert client.predictions.create(model=MODEL, input={"prompt": prompt}).status == "starting"
    assert server.stats()["by_prompt"][prompt] == 2


def test_an_ambiguous_create_can_drop_the_connection_without_an_answer(server: LiveServer, client: Client) -> None:
    prompt = unique("[[create_ambiguous:drop*1]]")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert len(listed_with(client, prompt)) == 1
    assert server.stats()["faults"]["create_ambiguous_drop"] >= 1


def test_p_create_ambiguous_makes_every_prediction_and_answers_each_way(server: LiveServer, client: Client) -> None:
    """Given p_create_ambiguous 1 over 502, 504 and drop, every create is answered by one of them and made."""
    url = f"{server.base_url}/_fake/config"
    prompts = [unique("globally ambiguous") for _ in range(12)]
    seen: set[str] = set()
    try:
        assert httpx.put(url, json={"p_create_ambiguous": 1.0}).json()["create_ambiguous_answers"] == "502,504,drop"
        for prompt in prompts:
            try:
                client.predictions.create(model=MODEL, input={"prompt": prompt})
            except ReplicateError as exc:
                seen.add(str(exc.status))
            except httpx.RemoteProtocolError:
                seen.add("drop")
    finally:
        httpx.put(url, json={"p_create_ambiguous": 0})
    assert seen == {"502", "504", "drop"}
    by_prompt = server.stats()["by_prompt"]
    assert all(by_prompt.get(prompt) == 1 for prompt in prompts)
    assert httpx.put(url, json={"create_ambiguous_answers": "500,teapot"}).status_code == 400


@pytest.mark.asyncio
async def test_an_ambiguous_drop_in_process_fails_the_request() -> None:
    async with asgi_client(FakeConfig(latency=0, p_create_ambiguous=1, create_ambiguous_answers="drop")) as tc:
        with pytest.raises(ConnectionDropped):
            await tc.post(f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "p"}}, headers=AUTH)
        stats = (await tc.get("/_fake/stats")).json()
        assert stats["predictions"] == 1 and stats["faults"] == {"create_ambiguous_drop": 1}


def test_ambiguous_knobs_from_flags() -> None:
    config = build_config(["--p-create-ambiguous", "0.3", "--create-ambiguous-answers", "504"], {})
    assert (config.p_create_ambiguous, config.create_ambiguous_answers) == (0.3, "504")
    with pytest.raises(SystemExit):
        build_config(["--create-ambiguous-answers", "200"], {})


# --------------------------------------------------------------------------- outages

V1_READS = ("/v1/predictions", f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/abc", "/v1/webhooks/default/secret")


def test_an_outage_refuses_every_endpoint_while_predictions_run_on(server: LiveServer, client: Client) -> None:
    """Given a prediction running, when an outage starts (POST /_fake/outage), then every Replicate endpoint
    answers 503 and the control routes still answer; once it ends the prediction is found finished."""
    running = client.predictions.create(model=MODEL, input={"prompt": unique("[[latency=0.3]]")})
    base = server.base_url
    started = httpx.post(f"{base}/_fake/outage", json={"seconds": 30}).json()
    assert started["active"] and 29 < started["remaining"] <= 30
    try:
        answers = [httpx.get(f"{base}{path}", headers=AUTH).status_code for path in V1_READS]
        answers.append(httpx.get(f"{base}/v1/predictions/{running.id}", headers=AUTH).status_code)
        answers.append(httpx.post(f"{base}/v1/predictions/{running.id}/cancel", headers=AUTH).status_code)
        create = httpx.post(f"{base}/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}}, headers=AUTH)
        answers.append(create.status_code)
        assert answers == [503] * 7
        assert create.json()["status"] == 503 and create.json()["title"] == "Service Unavailable"
        assert httpx.get(f"{base}/_fake/stats").status_code == 200
        time.sleep(0.4)  # the prediction ends meanwhile, unseen
        assert httpx.get(f"{base}/_fake/outage").json()["active"] is True
    finally:
        ended = httpx.post(f"{base}/_fake/outage", json={"seconds": 0}).json()
    assert ended == {"active": False, "remaining": 0}
    assert client.predictions.get(running.id).status == "succeeded"
    assert server.stats()["faults"]["outage_503"] >= 7
    assert httpx.post(f"{base}/_fake/outage", json={"seconds": "soon"}).status_code == 400


def test_an_outage_directive_refuses_its_create_and_starts_once(server: LiveServer, client: Client) -> None:
    """Given [[outage=1.5]], the first create with it is refused 503 with nothing made and starts the outage;
    once it is over, the same prompt creates as usual and starts no second one."""
    prompt = unique("[[outage=1.5]]")
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model=MODEL, input={"prompt": prompt})
    assert info.value.status == 503
    assert httpx.get(f"{server.base_url}/v1/predictions", headers=AUTH).status_code == 503
    time.sleep(1.55)
    assert client.predictions.create(model=MODEL, input={"prompt": prompt}).status == "starting"
    assert httpx.get(f"{server.base_url}/v1/predictions", headers=AUTH).status_code == 200
    assert server.stats()["by_prompt"][prompt] == 1


def test_an_outage_directive_with_after_lets_its_prediction_be_made_first(server: LiveServer) -> None:
    """Given [[outage=1.5:after=0]], the create makes its prediction and answers 201, then every endpoint is
    down for 1.5 s (the prediction's GETs too), then the prediction is seen again, finished."""
    base = server.base_url
    body = {"input": {"prompt": unique("[[outage=1.5:after=0]] [[latency=0.3]]")}}
    created = httpx.post(f"{base}/v1/models/{MODEL}/predictions", json=body, headers=AUTH)
    assert created.status_code == 201
    get = f"{base}/v1/predictions/{created.json()['id']}"
    assert httpx.get(get, headers=AUTH).status_code == 503
    time.sleep(1.55)
    assert httpx.get(get, headers=AUTH).json()["status"] == "succeeded"


# --------------------------------------------------------------------------- Cancel-After


def create_raw(server: LiveServer, prompt: str, **headers: str) -> httpx.Response:
    body = {"input": {"prompt": prompt, "width": 8, "height": 8}}
    return httpx.post(f"{server.base_url}/v1/models/{MODEL}/predictions", json=body, headers={**AUTH, **headers})


def read_raw(server: LiveServer, prediction_id: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{server.base_url}/v1/predictions/{prediction_id}", headers=AUTH).json()
    return found


def test_a_prediction_not_started_by_its_cancel_after_ends_aborted(server: LiveServer, client: Client) -> None:
    """Given Cancel-After 300ms and a prediction queued 5 s ([[starting=5]]), then at the deadline it is
    `aborted`, never started, with no output: what Replicate sends, which replicate 1.0.7 cannot parse."""
    created = create_raw(server, unique("[[starting=5]]"), **{"Cancel-After": "300ms"})
    assert created.status_code == 201 and created.json()["status"] == "starting"
    time.sleep(0.4)
    aborted = read_raw(server, created.json()["id"])
    assert aborted["status"] == "aborted" and aborted["started_at"] is None
    assert aborted["completed_at"] is not None and aborted["output"] is None and aborted["error"] is None
    assert aborted["logs"] == ""
    listed = httpx.get(f"{server.base_url}/v1/predictions", headers=AUTH).json()["results"]
    assert next(p for p in listed if p["id"] == aborted["id"])["status"] == "aborted"
    with pytest.raises(pydantic.v1.ValidationError):
        client.predictions.get(aborted["id"])
    assert httpx.post(aborted["urls"]["cancel"], headers=AUTH).json()["status"] == "aborted"
    assert server.stats()["statuses"]["aborted"] >= 1


def test_a_prediction_running_at_its_cancel_after_is_canceled(server: LiveServer, client: Client) -> None:
    created = create_raw(server, unique("[[latency=5]]"), **{"Cancel-After": "1s"})
    time.sleep(0.6)
    assert read_raw(server, created.json()["id"])["status"] == "processing"
    time.sleep(0.5)
    canceled = client.predictions.get(created.json()["id"])
    assert canceled.status == "canceled" and canceled.started_at is not None and canceled.output is None
    assert canceled.metrics is not None and 0.4 < canceled.metrics["predict_time"] < 1.0


def test_a_prediction_done_before_its_cancel_after_succeeds(server: LiveServer, client: Client) -> None:
    created = create_raw(server, unique(), **{"Cancel-After": "1m"})
    assert poll(client, created.json()["id"]).status == "succeeded"


def test_prefer_wait_returns_at_the_cancel_after(server: LiveServer) -> None:
    started = time.monotonic()
    answer = create_raw(server, unique("[[latency=5]]"), **{"Cancel-After": "0.5s", "Prefer": "wait=5"})
    assert 0.4 < time.monotonic() - started < 2.5
    assert answer.json()["status"] == "canceled"


def test_a_bad_cancel_after_is_refused_and_makes_nothing(server: LiveServer) -> None:
    prompt = unique()
    refused = create_raw(server, prompt, **{"Cancel-After": "soon"})
    assert refused.status_code == 400 and "Cancel-After" in refused.json()["detail"]
    assert server.stats()["by_prompt"].get(prompt) is None


def test_cancel_after_is_a_go_duration_or_seconds() -> None:
    assert [parse_cancel_after(v) for v in ("1m", "1h30m", "1.5s", "500ms", "90", "5m0s")] == [
        60.0,
        5400.0,
        1.5,
        0.5,
        90.0,
        300.0,
    ]
    assert parse_cancel_after(None) is None
    for bad in ("soon", "1 m", "-1s", "", "m", "1x"):
        with pytest.raises(ValueError):
            parse_cancel_after(bad)


@pytest.mark.asyncio
async def test_a_cancel_after_outlives_a_restart(tmp_path: Path) -> None:
    path = f"/v1/models/{MODEL}/predictions"
    body = {"input": {"prompt": "deadline [[latency=5]]"}}
    first = create_app(FakeConfig(), data_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://t") as tc:
        made = (await tc.post(path, json=body, headers={**AUTH, "Cancel-After": "0.5s"})).json()
    second = create_app(FakeConfig(), data_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://t") as tc:
        await asyncio.sleep(0.6)
        assert (await tc.get(f"/v1/predictions/{made['id']}", headers=AUTH)).json()["status"] == "canceled"
