"""build_app(): the Gradio shell over composer/. One Session, one builder per tab.

Every event has an explicit ``api_name`` so the app can be driven with ``gradio_client``.
Work on the loaded models runs in one concurrency group (one at a time); training runs as a
separate process that the Train tab tails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.handlers import bridges, recipe, runs
from app.handlers.chat import describe_loaded
from app.session import Session
from app.tabs import chat, compose, data, export, train
from app.ui import guard


def build_app(
    *,
    presets_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    models_dir: str | Path | None = None,
    session: Session | None = None,
    train_command: list[str] | None = None,
    poll_seconds: float = 1.0,
) -> gr.Blocks:
    """The app over ``session`` (or a new one over these folders; defaults: the repository's
    presets/, runs/ and models/). The session is ``demo.calm_session``."""
    session = session or Session.create(
        presets_dir=presets_dir,
        runs_dir=runs_dir,
        models_dir=models_dir,
        train_command=train_command,
    )
    with gr.Blocks(title="calm-composer", analytics_enabled=False) as demo:
        gr.Markdown(
            "# calm-composer\nCompose a frozen **anchor** model with a frozen **specialist** "
            "through a small trainable **bridge** (CALM, arXiv 2401.02412)."
        )
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Compose", id="compose", elem_id="tab-compose"):
                composing = compose.build(session)
            with gr.Tab("Data", id="data", elem_id="tab-data"):
                dataset = data.build(session)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                training = train.build(session, poll_seconds=poll_seconds)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                chatting = chat.build(session)
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                export.build(session)

        recipe_outputs = [
            composing.preset_info,
            composing.fetch_button,
            *composing.model_fields,
            *training.fields,
            dataset.path,
        ]

        def recipe_values() -> list[Any]:
            current = session.recipe
            return [
                compose.preset_markdown(session),
                compose.fetch_button_update(session),
                *compose.model_values(current),
                *train.hyperparameter_values(session),
                (current.get("data") or {}).get("train", ""),
            ]

        def apply_preset(preset_id: str | None) -> list[Any]:
            if preset_id:
                recipe.apply_preset(session, preset_id)
            return recipe_values()

        def check_if_ready() -> tuple[Any, ...]:
            if not _has_models(session):
                return "Choose a preset, or an anchor and a specialist, then Check pair.", [], ""
            return composing.show_report()

        def preview_if_ready(path: str) -> tuple[Any, ...]:
            if not _has_models(session):
                return "", [], []
            return dataset.preview(path)

        composing.preset.input(
            guard(apply_preset), composing.preset, recipe_outputs, api_name="apply_preset"
        ).then(
            check_if_ready,
            None,
            [composing.report, composing.pairs, composing.picture],
            api_name="check_preset",
        ).then(preview_if_ready, dataset.path, dataset.outputs, api_name="preview_preset_data")

        composing.fetched.then(
            check_if_ready,
            None,
            [composing.report, composing.pairs, composing.picture],
            api_name="check_after_fetch",
        )

        def on_load() -> list[Any]:
            for problem in session.preset_problems:
                gr.Warning(problem)
            names = runs.list_runs(session)
            run = session.current_run if session.current_run in names else _active_run(session)
            return [
                gr.Dropdown(choices=recipe.preset_choices(session), value=session.preset_id),
                *recipe_values(),
                gr.Dropdown(choices=names, value=run),
                describe_loaded(session),
                gr.Dropdown(choices=bridges.bridge_choices(session), value=_loaded_bridge(session)),
            ]

        demo.load(
            guard(on_load),
            None,
            [composing.preset, *recipe_outputs, training.run, chatting.loaded, chatting.bridge],
            api_name="load_page",
        ).then(
            check_if_ready,
            None,
            [composing.report, composing.pairs, composing.picture],
            api_name="check_on_load",
        ).then(preview_if_ready, dataset.path, dataset.outputs, api_name="preview_on_load").then(
            composing.list_models, None, composing.found, api_name="list_models_on_load"
        )
        chat_tab.select(
            chatting.refresh_bridges, chatting.bridge, chatting.bridge, api_name="chat_tab_opened"
        )
    demo.calm_session = session
    return demo


def _has_models(session: Session) -> bool:
    current = session.recipe
    return all((current.get(role) or {}).get("model") for role in ("anchor", "specialist"))


def _active_run(session: Session) -> str | None:
    """The newest run whose process is alive (a refresh or a second tab reconnects to it)."""
    names = runs.list_runs(session)
    for name in names:
        if runs.run_view(session, name, log_lines=0).state in train.ACTIVE:
            return name
    return names[0] if names else None


def _loaded_bridge(session: Session) -> str:
    return bridges.preferred_bridge(session)
