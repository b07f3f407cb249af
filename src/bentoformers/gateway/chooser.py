"""The served models by name, and the one a request asks for."""

from __future__ import annotations

from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import ModelEndpoint
from bentoformers.settings import Settings


class ModelChooser:
    """The served models by name; picks the one a request asks for, checking it serves the route's task."""

    def __init__(self, settings: Settings, endpoints: list[ModelEndpoint]) -> None:
        self.settings = settings
        self.models = {e.name: e for e in endpoints}
        if settings.default_model and settings.default_model not in self.models:
            raise RuntimeError(f"default_model {settings.default_model!r} is not served; served: {', '.join(self.models)}")

    async def ready(self) -> bool:
        """Every model service answered its last health call (gateway/health.py). Waits only for a first call,
        bounded by its timeout: it never waits on a model service after that."""
        for endpoint in self.models.values():
            endpoint.health.watch()
        for endpoint in self.models.values():
            if endpoint.health.state == "unknown":
                await endpoint.health.first_decided()
        return all(e.health.state == "up" for e in self.models.values())

    def pick(self, requested: str | None, task: str) -> ModelEndpoint:
        endpoint = self._pick(requested, task)
        endpoint.health.watch()
        return endpoint

    def pick_any(self, requested: str | None) -> ModelEndpoint:
        """The model a request names, whatever its task; absent: the default model, else the first served."""
        if requested is None:
            return self.models.get(self.settings.default_model) or next(iter(self.models.values()))
        if requested not in self.models:
            raise ApiError(
                ErrorType.NOT_FOUND, f"model {requested!r} is not served here; available: {self._listing()}", param="model"
            )
        return self.models[requested]

    def _pick(self, requested: str | None, task: str) -> ModelEndpoint:
        if requested is None:
            default = self.models.get(self.settings.default_model)
            if default is not None and default.task == task:
                return default
            for endpoint in self.models.values():
                if endpoint.task == task:
                    return endpoint
            raise ApiError(ErrorType.NOT_FOUND, f"no {task} model is served here; served: {self._listing()}", param="model")
        endpoint = self.models.get(requested)
        if endpoint is None:
            raise ApiError(
                ErrorType.NOT_FOUND, f"model {requested!r} is not served here; available: {self._listing()}", param="model"
            )
        if endpoint.task != task:
            raise ApiError(
                ErrorType.INVALID_REQUEST,
                f"model {requested!r} is a {endpoint.task} model; this route needs a {task} model "
                f"(served: {self._listing()})",
                param="model",
            )
        return endpoint

    def _listing(self) -> str:
        return ", ".join(f"{e.name} ({e.task})" for e in self.models.values())
