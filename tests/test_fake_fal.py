"""The fake fal against the real, unmodified `fal-client` (async) and plain httpx, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import fal_client
import httpx
import pytest
from PIL import Image

from fake_fal.cli import build_settings
from fake_fal.config import FakeFalConfig
from fake_fal.directives import ReadFault, SubmitFault, parse_directives
from fal_live import LiveFake, live_fake

AUTH = {"Authorization": "Key test"}
SCHNELL = "fal-ai/flux/schnell"
DEV = "fal-ai/flux/dev"
PRO = "fal-ai/flux-pro/v1.1"
SD35 = "fal-ai/stable-diffusion-v35-large"


class ToFake(httpx.AsyncBaseTransport):
    """Sends fal-client's https://queue.fal.run/... requests to the plain-HTTP fake instead."""

    def __init__(self, base_url: str) -> None:
        self.base = httpx.URL(base_url)
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            request.url = request.url.copy_with(scheme=self.base.scheme, host=self.base.host, port=self.base.port)
            request.headers["host"] = self.base.netloc.decode()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FalAtFake(fal_client.AsyncClient):
    """The unmodified client, its HTTP client swapped for one whose transport reaches the fake."""

    def __init__(self, base_url: str, key: str = "test") -> None:
        super().__init__(key=key)
        self.http = httpx.AsyncClient(transport=ToFake(base_url), headers={"Authorization": f"Key {key}"}, timeout=30)

    @property  # type: ignore[override]
    def _client(self) -> Awaitable[httpx.AsyncClient]:
        async def ready() -> httpx.AsyncClient:
            return self.http

        return ready()


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.3, seed=1)) as running:
        yield running


@pytest.fixture
async def fal(fake: LiveFake) -> AsyncIterator[FalAtFake]:
    client = FalAtFake(fake.url)
    yield client
    await client.http.aclose()


def unique(text: str = "a red fox") -> str:
    return f"{text} {uuid.uuid4().hex[:10]}"


async def image_at(url: str) -> Image.Image:
    async with httpx.AsyncClient() as http:
        answer = await http.get(url)
    assert answer.status_code == 200, answer.text
    return Image.open(io.BytesIO(answer.content))


# --------------------------------------------------------------------------- the queue protocol


async def test_a_request_moves_through_the_queue_and_its_images_are_real(fal: FalAtFake) -> None:
    """Given a submit, the client sees IN_QUEUE, IN_PROGRESS with logs, COMPLETED; the result is fal's shape."""
    prompt = unique("[[queue=0.4]] [[latency=1.2]]")  # long enough phases to be seen on a busy machine
    handle = await fal.submit(DEV, {"prompt": prompt, "image_size": "square", "num_images": 2, "seed": 7})
    assert handle.status_url.endswith(f"/fal-ai/flux/requests/{handle.request_id}/status")
    seen = [status async for status in handle.iter_events(with_logs=True, interval=0.02)]
    kinds = [type(status).__name__ for status in seen]
    assert kinds[0] == "Queued" and "InProgress" in kinds and kinds[-1] == "Completed"
    in_progress = next(s for s in seen if isinstance(s, fal_client.InProgress))
    assert in_progress.logs and {"message", "level", "timestamp"} <= set(in_progress.logs[0])
    done = seen[-1]
    assert isinstance(done, fal_client.Completed) and done.error is None and done.metrics["inference_time"] > 0
    result = await handle.get()
    assert set(result) >= {"images", "seed", "has_nsfw_concepts", "timings", "prompt"}
    assert result["seed"] == 7 and result["has_nsfw_concepts"] == [False, False]
    first = result["images"][0]
    assert (first["width"], first["height"], first["content_type"]) == (512, 512, "image/jpeg")
    image = await image_at(first["url"])
    assert image.format == "JPEG" and image.size == (512, 512)
    second = await image_at(result["images"][1]["url"])
    assert second.tobytes() != image.tobytes()


@pytest.mark.parametrize("endpoint", [SCHNELL, DEV, PRO, SD35])
async def test_each_default_model_answers_its_defaults(fal: FalAtFake, endpoint: str) -> None:
    result = await fal.subscribe(endpoint, {"prompt": unique()}, client_timeout=None)
    assert len(result["images"]) == 1
    image = result["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (1024, 768, "image/jpeg")
    assert isinstance(result["seed"], int)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("square_hd", (1024, 1024)),
        ("portrait_4_3", (768, 1024)),
        ("portrait_16_9", (576, 1024)),
        ("landscape_16_9", (1024, 576)),
        ({"width": 640, "height": 480}, (640, 480)),
    ],
)
async def test_image_size_is_an_enum_or_width_and_height(fal: FalAtFake, size: Any, expected: tuple[int, int]) -> None:
    handle = await fal.submit(SCHNELL, {"prompt": unique(), "image_size": size, "output_format": "png"})
    result = await handle.get(interval=0.02)
    image = await image_at(result["images"][0]["url"])
    assert image.format == "PNG" and image.size == expected
    assert result["images"][0]["content_type"] == "image/png"


@pytest.mark.parametrize(
    ("arguments", "loc", "kind"),
    [
        ({"num_images": 5}, ["body", "num_images"], "less_than_equal"),
        ({"output_format": "webp"}, ["body", "output_format"], "literal_error"),
        ({"image_size": "huge"}, ["body", "image_size"], "literal_error"),
        ({"image_size": {"width": 0, "height": 64}}, ["body", "image_size", "width"], "greater_than_equal"),
        ({"num_inference_steps": 13}, ["body", "num_inference_steps"], "less_than_equal"),
        ({"enable_safety_checker": "yes"}, ["body", "enable_safety_checker"], "bool_type"),
    ],
)
async def test_bad_input_completes_with_a_422_shaped_like_fals(
    fal: FalAtFake, arguments: dict[str, Any], loc: list[str], kind: str
) -> None:
    """Like fal's queue, the submit is accepted and the runner refuses: the result is a 422 `detail` list."""
    handle = await fal.submit(SCHNELL, {"prompt": unique(), **arguments})
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        await handle.get(interval=0.02)
    assert refused.value.status_code == 422
    detail = refused.value.response.json()["detail"]
    assert detail[0]["loc"] == loc and detail[0]["type"] == kind and detail[0]["msg"]
    status = await handle.status()
    assert isinstance(status, fal_client.Completed) and status.error


async def test_a_missing_prompt_is_refused(fake: LiveFake) -> None:
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
        submitted = (await http.post(f"/{SD35}", json={"num_images": 1})).json()
        await asyncio.sleep(0.35)
        answer = await http.get(submitted["response_url"])
    assert answer.status_code == 422
    assert answer.json()["detail"][0] | {"input": None} == {
        "loc": ["body", "prompt"],
        "msg": "Field required",
        "type": "missing",
        "input": None,
    }


async def test_the_queue_position_counts_the_requests_ahead(fal: FalAtFake) -> None:
    app = "fal-ai/stand-in-queue"
    handles = [await fal.submit(app, {"prompt": unique(f"[[queue=5]] [[latency=6]] {i}")}) for i in range(3)]
    positions = []
    for handle in handles:
        status = await handle.status()
        assert isinstance(status, fal_client.Queued)
        positions.append(status.position)
    assert positions == [0, 1, 2]
    for handle in handles:
        await handle.cancel()


async def test_with_busy_runners_requests_wait_in_the_queue_or_time_out(fal: FalAtFake, fake: LiveFake) -> None:
    """Given one runner per app, the second request waits for the first; one that may not wait that long
    (fal-client's `start_timeout`) completes with fal's 504 `request_timeout`."""
    app = f"fal-ai/busy-{uuid.uuid4().hex[:6]}"
    fake.configure(concurrency=1)
    try:
        first = await fal.submit(app, {"prompt": unique("[[queue=0]] [[latency=1.5]]")})
        second = await fal.submit(app, {"prompt": unique("[[queue=0]] [[latency=1.5]]")})
        hurried = await fal.submit(app, {"prompt": unique("[[queue=0]] [[latency=1.5]]")}, start_timeout=2)
    finally:
        fake.configure(concurrency=0)
    assert isinstance(await first.status(), fal_client.InProgress)
    waiting = await second.status()
    assert isinstance(waiting, fal_client.Queued) and waiting.position == 0  # next in line
    with pytest.raises(fal_client.FalClientHTTPError) as gave_up:
        await hurried.get(interval=0.05)
    assert gave_up.value.status_code == 504 and gave_up.value.error_type == "request_timeout"
    started = time.monotonic()
    assert (await second.get(interval=0.05))["images"]
    assert time.monotonic() - started > 0.5


async def test_cancel_a_queued_request_and_not_a_completed_one(fal: FalAtFake, fake: LiveFake) -> None:
    handle = await fal.submit(SCHNELL, {"prompt": unique("[[latency=30]]")})
    await handle.cancel()
    status = await handle.status(with_logs=True)
    assert isinstance(status, fal_client.Completed) and status.error == "Request cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as no_result:
        await fal.result(SCHNELL, handle.request_id)
    assert no_result.value.status_code == 400
    done = await fal.submit(SCHNELL, {"prompt": unique("[[latency=0]]")})
    with pytest.raises(fal_client.FalClientHTTPError) as too_late:
        await done.cancel()
    assert too_late.value.status_code == 400 and too_late.value.response.json() == {"status": "ALREADY_COMPLETED"}
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
        unknown = await http.put(f"/fal-ai/flux/requests/{uuid.uuid4()}/cancel")
    assert unknown.status_code == 404 and unknown.json() == {"status": "NOT_FOUND"}


async def test_resume_by_request_id_needs_only_the_app_and_the_id(fal: FalAtFake) -> None:
    """A worker that crashed after submit finds its request again from the endpoint id and request id."""
    handle = await fal.submit(DEV, {"prompt": unique()})
    again = await fal.get_handle(DEV, handle.request_id)
    assert again.status_url.startswith("https://queue.fal.run/fal-ai/flux/requests/")
    result = await again.get(interval=0.02)
    assert len(result["images"]) == 1


async def test_auth_is_required_and_a_wrong_key_refused(fake: LiveFake) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.post(f"/{SCHNELL}", json={"prompt": "p"})).status_code == 401
    fake.configure(api_key="right")
    try:
        wrong = FalAtFake(fake.url, key="wrong")
        with pytest.raises(fal_client.FalClientHTTPError) as refused:
            await wrong.submit(SCHNELL, {"prompt": "p"})
        assert refused.value.status_code == 401
    finally:
        fake.configure(api_key=None)


# --------------------------------------------------------------------------- faults


async def test_a_submit_500_enqueues_nothing(fal: FalAtFake, fake: LiveFake) -> None:
    prompt = unique("[[submit:500*1]]")
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        await fal.submit(SCHNELL, {"prompt": prompt})
    assert refused.value.status_code == 500
    assert fake.stats()["by_prompt"].get(prompt) is None
    await fal.submit(SCHNELL, {"prompt": prompt})
    assert fake.stats()["by_prompt"][prompt] == 1


async def test_a_429_has_retry_after_and_the_client_retries_it_itself(fal: FalAtFake, fake: LiveFake) -> None:
    prompt = unique("[[submit:429*2:retry_after=3]]")
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
        answer = await http.post(f"/{SCHNELL}", json={"prompt": prompt})
    assert answer.status_code == 429 and answer.headers["retry-after"] == "3" and answer.json()["detail"]
    handle = await fal.submit(SCHNELL, {"prompt": prompt})  # the second 429 is retried inside fal-client
    assert handle.request_id and fake.stats()["by_prompt"][prompt] == 1


async def test_an_ambiguous_502_enqueues_and_the_clients_retry_enqueues_twice(fal: FalAtFake, fake: LiveFake) -> None:
    """fal-client retries an ingress 502 on submit: the first request exists, the caller never learns its id."""
    prompt = unique("[[submit:502*1:enqueued]]")
    handle = await fal.submit(SCHNELL, {"prompt": prompt})
    assert fake.stats()["by_prompt"][prompt] == 2
    assert handle.request_id in fake.app.state.fake.requests
    assert fake.stats()["faults"]["submit_502_enqueued"] >= 1


async def test_a_dropped_submit_enqueues_all_the_same(fake: LiveFake) -> None:
    prompt = unique("[[submit:drop*1]]")
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(f"/{SCHNELL}", json={"prompt": prompt})
    assert fake.stats()["by_prompt"][prompt] == 1


async def test_a_hung_submit_has_enqueued_before_it_answers(fake: LiveFake) -> None:
    prompt = unique("[[hang_submit=1*1]]")
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"/{SCHNELL}", json={"prompt": prompt})
    assert fake.stats()["by_prompt"][prompt] == 1


async def test_an_outage_refuses_every_queue_route_until_it_ends(fal: FalAtFake, fake: LiveFake) -> None:
    handle = await fal.submit(SCHNELL, {"prompt": unique()})
    httpx.post(f"{fake.url}/_fake/outage", json={"seconds": 1.0, "status": 503}).raise_for_status()
    with pytest.raises(fal_client.FalClientHTTPError) as down:
        await fal.submit(SCHNELL, {"prompt": unique()})
    assert down.value.status_code == 503
    with pytest.raises(fal_client.FalClientHTTPError):
        await handle.status()
    assert httpx.get(f"{fake.url}/_fake/outage").json()["active"] is True
    await asyncio.sleep(1.1)
    assert isinstance(await handle.status(), fal_client.Status)
    assert httpx.get(f"{fake.url}/_fake/outage").json() == {"active": False, "remaining": 0.0, "status": 503}


async def test_an_outage_directive_refuses_its_submit_or_starts_after_it(fal: FalAtFake, fake: LiveFake) -> None:
    prompt = unique("[[outage=0.5]]")
    with pytest.raises(fal_client.FalClientHTTPError) as down:
        await fal.submit(SCHNELL, {"prompt": prompt})
    assert down.value.status_code == 503 and prompt not in fake.stats()["by_prompt"]
    await asyncio.sleep(0.6)
    assert (await fal.submit(SCHNELL, {"prompt": prompt})).request_id  # only its first submit starts one
    later = await fal.submit(SCHNELL, {"prompt": unique("[[outage=1:after=0.5]]")})
    assert isinstance(await later.status(), fal_client.Status)
    await asyncio.sleep(0.6)
    with pytest.raises(fal_client.FalClientHTTPError):
        await later.status()
    await asyncio.sleep(1.0)


async def test_read_faults_a_503_from_fal_and_an_ingress_504(fal: FalAtFake) -> None:
    """A 503 with fal's x-fal-request-id reaches the caller; an nginx 504 is retried inside fal-client."""
    handle = await fal.submit(SCHNELL, {"prompt": unique("[[status:503*1]]")})
    with pytest.raises(fal_client.FalClientHTTPError) as failed:
        await handle.status()
    assert failed.value.status_code == 503 and failed.value.error_type == "runner_scheduling_failure"
    assert isinstance(await handle.status(), fal_client.Status)
    ingress = await fal.submit(SCHNELL, {"prompt": unique("[[status:504*2]] [[result:502*1]]")})
    assert (await ingress.get(interval=0.02))["images"]


async def test_a_runner_failure_completes_with_an_error(fal: FalAtFake) -> None:
    prompt = unique("[[fail*1]]")
    handle = await fal.submit(DEV, {"prompt": prompt})
    with pytest.raises(fal_client.FalClientHTTPError) as failed:
        await handle.get(interval=0.02)
    assert failed.value.status_code == 500 and failed.value.error_type == "internal_server_error"
    assert (await (await fal.submit(DEV, {"prompt": prompt})).get(interval=0.02))["images"]


async def test_the_invalid_directive_and_the_latency_directive(fal: FalAtFake) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        await (await fal.submit(DEV, {"prompt": unique("[[invalid]]")})).get(interval=0.02)
    assert refused.value.status_code == 422
    started = time.monotonic()
    await (await fal.submit(DEV, {"prompt": unique("[[latency=0.8]]")})).get(interval=0.02)
    assert time.monotonic() - started >= 0.8


async def test_nsfw_images_are_flagged_and_black_and_flux_pro_refuses_them(fal: FalAtFake) -> None:
    result = await (await fal.submit(DEV, {"prompt": unique("[[nsfw:1]]"), "num_images": 2})).get(interval=0.02)
    assert result["has_nsfw_concepts"] == [True, False]
    black = await image_at(result["images"][0]["url"])
    assert black.convert("L").getextrema()[1] < 10
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        await (await fal.submit(PRO, {"prompt": unique("[[nsfw:1]]")})).get(interval=0.02)
    assert refused.value.status_code == 422
    assert refused.value.response.json()["detail"][0]["type"] == "content_policy_violation"


async def test_global_faults_apply_live(fal: FalAtFake, fake: LiveFake) -> None:
    fake.configure(p_submit_500=1.0)
    try:
        with pytest.raises(fal_client.FalClientHTTPError):
            await fal.submit(SCHNELL, {"prompt": unique()})
    finally:
        fake.configure(p_submit_500=0.0)
    assert (await fal.submit(SCHNELL, {"prompt": unique()})).request_id
    answer = httpx.put(f"{fake.url}/_fake/config", json={"p_fail": 2})
    assert answer.status_code == 400


async def test_output_404_directive(fal: FalAtFake) -> None:
    result = await (await fal.submit(SCHNELL, {"prompt": unique("[[output:404]]")})).get(interval=0.02)
    async with httpx.AsyncClient() as http:
        assert (await http.get(result["images"][0]["url"])).status_code == 404


# --------------------------------------------------------------------------- pieces


def test_parse_directives() -> None:
    found = parse_directives("x [[submit:502*2:enqueued]] [[submit:drop]] [[status:503*1]] [[fail*3]] [[queue=2]]")
    assert found.submit_faults == (SubmitFault(502, 2, True), SubmitFault(0, None, True))
    assert found.status_faults == (ReadFault(503, 1),)
    assert (found.fail, found.fail_count, found.queue) == (True, 3, 2.0)
    assert parse_directives("no markers [[unknown]]") == parse_directives("")


def test_settings_from_flags_and_env(tmp_path: Any) -> None:
    env = {"FAKE_FAL_LATENCY": "0.5", "FAKE_FAL_PORT": "6000", "FAKE_FAL_DATA_DIR": str(tmp_path)}
    settings = build_settings(["--p-submit-429", "0.25", "--outage", "3"], env)
    assert settings.config.latency == 0.5 and settings.config.p_submit_429 == 0.25
    assert (settings.port, settings.data_dir, settings.outage) == (6000, tmp_path, 3.0)
    assert build_settings(["--latency", "2"], env).config.latency == 2.0
    with pytest.raises(SystemExit):
        build_settings(["--p-fail", "2"], {})
