"""The WSGI factory: config -> loaded models -> Flask app with routes and JSON errors."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from serve.access import register_request_hooks
from serve.auth import ApiKeys, register_auth
from serve.config import ServeConfig, build_config, load_config
from serve.errors import register_error_handlers
from serve.lifecycle import Lifecycle, check_state_dir
from serve.metrics import Metrics
from serve.openapi import build_openapi, v1_paths, v2_paths
from serve.page import page
from serve.routes import bp, management
from serve.service import PredictionService
from serve.tracing import Tracing
from serve.v1 import v1
from serve.v2 import v2


def create_app(config: ServeConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the app; with no argument the config comes from SERVE_CONFIG or models/models.yaml.

    Raises:
        ConfigError, DeviceError, CheckpointError: the server must not start.
    """
    if config is None:
        config = load_config()
    elif not isinstance(config, ServeConfig):
        config = build_config(config)
    api_keys = ApiKeys.from_settings(config.server)  # a broken keys file stops start-up before any model loads
    if config.server.enable_management:
        check_state_dir(config.server.state_dir)
    metrics = Metrics()
    # Tracing (OTEL_*; a missing extra stops start-up here): its provider is made per serving process,
    # after gunicorn's fork (serve/gunicorn_conf.py), or at a process's first request outside gunicorn.
    tracing = Tracing(config.server)
    service = PredictionService.load(config, metrics=metrics, tracing=tracing)
    app = Flask(__name__, static_folder=None)  # the page blueprint serves serve/static itself
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_upload_bytes
    # Parsing costs per part: cap the parts near the image limit (werkzeug's default is 1000).
    app.config["MAX_FORM_PARTS"] = config.server.max_images_per_request + 16
    app.json.sort_keys = False
    app.extensions["serve"] = service
    app.extensions["serve.metrics"] = metrics
    # Versions loaded, made default, unloaded or reloaded through the management API, in every worker:
    # the control file in state_dir is applied before serving (a worker respawned later too).
    models_dir = config.server.models_dir or (config.source.parent if config.source is not None else None)
    lifecycle = Lifecycle(service.table, config.server.state_dir, models_dir, metrics)
    lifecycle.sync()
    app.extensions["serve.lifecycle"] = lifecycle
    names = list(service.table.models)
    app.extensions["serve.openapi"] = build_openapi(service.table, {**v2_paths(names), **v1_paths(service.table)},
                                                   management=config.server.enable_management)
    app.register_blueprint(bp)
    app.register_blueprint(v2)
    app.register_blueprint(v1)
    app.register_blueprint(page)
    if config.server.enable_management:
        app.register_blueprint(management)
    register_error_handlers(app)
    register_request_hooks(app, metrics, service.table.default_name, frozenset(service.table.models), tracing)
    app.before_request(lifecycle.watch)  # once per process: the watcher thread (gunicorn starts it earlier)
    register_auth(app, api_keys)  # after the request hooks: a refused request is logged and counted too
    return app
