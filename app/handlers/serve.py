"""The Chat tab's Serve switch: the loaded composition over the OpenAI-compatible API
(composer.serve), on this machine only, sharing the app's model lock so the page's own chat and
the API's clients take turns."""

from __future__ import annotations

from app.handlers.chat import require_loaded
from app.session import Session
from composer.config import ConfigError

HOST = "127.0.0.1"  # loopback only, whatever address the app itself binds
PORT = 8000  # calm-composer serve's default; another free port when it is taken


def start_serving(session: Session, *, port: int = PORT) -> tuple[str, str]:
    """Serve what is loaded (and what gets loaded later); returns (status markdown, snippet)."""
    from composer.network import port_is_free
    from composer.openai_api import default_model_name
    from composer.serve import BackgroundServer, create_app

    if session.server is None:
        composition = require_loaded(session)
        recipe = composition.recipe
        name = default_model_name(recipe.name if recipe is not None else None, "calm-composer")
        app = create_app(
            get_composition=lambda: session.loaded.composition if session.loaded else None,
            model_name=name,
            lock=session.model_lock,
        )
        chosen = port if port_is_free(HOST, port) else 0  # 0: any free port
        session.server = BackgroundServer(app, host=HOST, port=chosen)
    return serving_status(session)


def stop_serving(session: Session) -> tuple[str, str]:
    if session.server is not None:
        session.server.stop()
        session.server = None
    return serving_status(session)


def serving_status(session: Session) -> tuple[str, str]:
    """(markdown with the URL and model names, the openai client snippet); empty when off."""
    server = session.server
    if server is None:  # before importing composer.serve: the page loads without torch
        return "", ""
    from composer.openai_api import ANCHOR_SUFFIX
    from composer.serve import client_snippet

    name = server.app.state.settings.model_name
    text = (
        f"Serving at **{server.url}** (this machine only): model `{name}` is the composition, "
        f"`{name}{ANCHOR_SUFFIX}` the anchor alone. Any OpenAI-compatible client works; "
        "requests take turns with this page's chat."
    )
    return text, client_snippet(server.url, name)


def toggle_serving(session: Session, on: bool) -> tuple[str, str]:
    if not on:
        return stop_serving(session)
    if session.loaded is None:
        raise ConfigError("no models are loaded; press Load models first, then Serve")
    return start_serving(session)
