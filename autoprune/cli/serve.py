"""The ``serve`` command: the HTTP service (:mod:`autoprune.service`) with its settings from
the command line. Its help lists the request limits without importing the service itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autoprune.cli.options import AddressOpt, UriOpt
from autoprune.service import limits as service_limits


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tracking_uri: UriOpt = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the service.")] = "service",
    ray_address: AddressOpt = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token (or AUTOPRUNE_TOKEN).")
    ] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Searches running at once.")] = 2,
    max_workers: Annotated[int, typer.Option(min=1, help="Ray workers per search.")] = 2,
    max_evaluations: Annotated[int, typer.Option(min=1, help="Evaluations per search.")] = 2000,
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Checkpoint upload limit.")] = 64,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: change one bound on what a request may cost (repeatable). "
            f"Defaults: {service_limits.describe()}.",
            metavar="NAME=VALUE",
        ),
    ] = None,
) -> None:
    """The HTTP service: launch searches, follow them, fetch the best per-layer ratios.

    OpenAPI schema at /openapi.json (docs at /docs). Without a token it binds to loopback only.

    Examples:
      autoprune serve --port 8080
      AUTOPRUNE_TOKEN=... autoprune serve --host 0.0.0.0 --ray-address auto
    """
    from autoprune.service.app import serve as run_service
    from autoprune.service.settings import Settings, check_bind, load_token

    try:
        values = service_limits.parse(
            limit or [], workers=max_workers, evaluations=max_evaluations, upload_mb=max_upload_mb
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--limit") from None
    limits = service_limits.Limits(**values)
    settings = Settings(
        host=host, port=port, token=load_token(token_file), tracking_uri=tracking_uri,
        experiment=experiment, ray_address=ray_address, max_concurrent=max_concurrent,
        limits=limits,
    )  # fmt: skip
    check_bind(settings)
    run_service(settings)
