"""Registry: every configured model loaded, warmed and looked up by name."""
from __future__ import annotations

import logging

from serve.config import ServeConfig
from serve.errors import ModelNotFoundError
from serve.loader import load_labels, load_model
from serve.predictor import Predictor

log = logging.getLogger(__name__)


class Registry:
    """The predictors of one ServeConfig, in config order."""

    def __init__(self, config: ServeConfig, predictors: dict[str, Predictor]):
        self.config = config
        self.predictors = predictors

    @classmethod
    def load(cls, config: ServeConfig, names: list[str] | None = None) -> Registry:
        """Load and warm up every model (or those named); any failure stops here, so nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        predictors = {}
        for spec in config.models:
            if names is not None and spec.name not in names:
                continue
            predictor = Predictor(spec, load_model(spec), load_labels(spec), config.server.max_image_pixels)
            predictor.warm_up()
            predictors[spec.name] = predictor
        return cls(config, predictors)

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        return bool(self.predictors) and all(p.ready for p in self.predictors.values())

    def get(self, name: str) -> Predictor:
        """Raises: ModelNotFoundError: no model of that name."""
        try:
            return self.predictors[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named '{name}'; models: {sorted(self.predictors)}") from None
