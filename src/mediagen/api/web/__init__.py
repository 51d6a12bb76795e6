"""The web page at `/` and the API docs at `/docs`, served from files shipped in this package.

Plain HTML, CSS and JavaScript (no build step, nothing from a CDN, so it works offline): the form is
drawn from `GET /models`, a job is followed over `GET /jobs/{id}/events`. Swagger UI's own files come
from the `swagger-ui-py` package (Apache-2.0), which ships the swagger-ui-dist bundle.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).parent
SWAGGER_FILES = Path(swagger_ui.__file__).parent / "static"


def install(app: FastAPI) -> None:
    """`/`, `/static/*`, and `/docs` with Swagger UI's files served from here (call with docs_url=None)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(HERE / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API docs",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_ui_parameters={"validatorUrl": None},  # the default asks validator.swagger.io
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_FILES), name="swagger")
    app.mount("/static", StaticFiles(directory=HERE), name="web")
