"""Train tab: hyperparameters, Start / Stop / Resume, and a live view of the run's files.

Training is the separate `calm-composer train` process; this tab only writes the recipe, starts
the process and tails what it writes (a timer), so a refreshed page or a second tab reconnects.
"""

from __future__ import annotations

import html
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd

from app.handlers import runs
from app.session import Session
from app.ui import guard
from composer import progress
from composer.pacing import format_bytes, format_duration

ACTIVE = (runs.STARTING, *(s.value for s in progress.LIVE))  # the run is (about to be) writing


def build(session: Session, *, poll_seconds: float = 1.0) -> SimpleNamespace:
    fields = []
    with gr.Accordion("Hyperparameters (the preset's defaults)", open=True):
        with gr.Row():
            for key, help_text, whole in runs.form_fields():
                fields.append(
                    gr.Number(
                        label=key,  # the recipe's own name for it (training.KEY / data.KEY)
                        info=help_text,
                        precision=0 if whole else None,
                        elem_id=f"hp-{key.replace('_', '-')}",
                        min_width=120,
                    )
                )
    with gr.Row():
        run_name = gr.Textbox(label="New run name (empty: automatic)", elem_id="run-name", scale=2)
        start = gr.Button("Start", variant="primary", elem_id="start-training", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="stop-training", scale=1)
        resume = gr.Button("Resume", elem_id="resume-training", scale=1)
    with gr.Row():
        run = gr.Dropdown(
            label="Run (folder under runs/)",
            choices=runs.list_runs(session),
            allow_custom_value=True,
            elem_id="run-select",
            scale=3,
        )
        refresh = gr.Button("Refresh runs", elem_id="refresh-runs", scale=1)
    bar = gr.HTML(progress_html(runs.RunView(name="", state="none")), elem_id="train-progress")
    state = gr.Textbox(label="Status", interactive=False, elem_id="train-status", lines=2)
    stats = gr.Markdown(elem_id="train-stats")
    plot = gr.LinePlot(
        value=None,
        x="step",
        y="loss",
        color="series",
        label="Loss (raw, smoothed, eval)",
        x_title="step",
        y_title="loss per token",
        color_map={"raw": "#9aa5b1", "smoothed": "#e07b00", "eval": "#2563eb"},
        # no fixed height: with one, Gradio's chart clips its own legend (series names) away
        elem_id="loss-plot",
    )
    log = gr.Textbox(
        label="Log (tail)", lines=10, max_lines=10, interactive=False, elem_id="train-log"
    )
    timer = gr.Timer(poll_seconds)

    def poll(name: str | None) -> tuple[Any, ...]:
        view = runs.run_view(session, name)
        return (
            progress_html(view),
            status_text(view),
            stats_markdown(view),
            _frame(runs.loss_series(view.records)),
            view.log_tail,
        )

    view_outputs = [bar, state, stats, plot, log]
    timer.tick(
        guard(poll),
        run,
        view_outputs,
        api_name="poll_run",
        show_progress="hidden",
        concurrency_limit=None,
        concurrency_id="poll",
    )
    run.change(guard(poll), run, view_outputs, api_name="show_run", show_progress="hidden")

    def start_run(name: str, *values: Any) -> Any:
        hyper = dict(zip(runs.FORM_FIELDS, values, strict=True))
        started = runs.start_training(session, run_name=name, hyperparameters=hyper)
        gr.Info(f"run {started} started: loading the models")
        return gr.Dropdown(choices=runs.list_runs(session), value=started)

    start.click(guard(start_run), [run_name, *fields], run, api_name="start_training")

    def stop_run(name: str) -> str:
        runs.stop_training(session, name)
        return f"stopping {name}: it writes a checkpoint at the end of this step"

    stop.click(guard(stop_run), run, state, api_name="stop_training")

    def resume_run(name: str) -> Any:
        runs.resume_training(session, name)
        gr.Info(f"run {name} resumes from its last checkpoint")
        return gr.Dropdown(choices=runs.list_runs(session), value=name)

    resume.click(guard(resume_run), run, run, api_name="resume_training")

    def refresh_runs(name: str | None) -> Any:
        names = runs.list_runs(session)
        return gr.Dropdown(choices=names, value=name if name in names else (names or [None])[0])

    refresh.click(guard(refresh_runs), run, run, api_name="refresh_runs")
    return SimpleNamespace(fields=fields, run=run, run_name=run_name)


def hyperparameter_values(session: Session) -> list[Any]:
    defaults = runs.training_defaults(session)
    return [defaults.get(key) for key in runs.FORM_FIELDS]


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    """The plot's data; None (not an empty frame) before the first point: a plot that started
    from an empty frame never draws its lines (gradio 6)."""
    if not rows:
        return None
    return pd.DataFrame(
        {
            "step": pd.Series([r["step"] for r in rows], dtype="int64"),
            "loss": pd.Series([r["loss"] for r in rows], dtype="float64"),
            "series": pd.Series([r["series"] for r in rows], dtype="object"),
        }
    )


def progress_html(view: runs.RunView) -> str:
    percent = 100 * view.fraction
    total = view.max_steps or "?"
    eta = format_duration(view.eta_s) if view.state in ACTIVE and view.eta_s is not None else "—"
    label = (
        f"step {view.step} / {total} · {percent:.0f}% · ETA {eta}"
        if view.state != "none"
        else "no run selected"
    )
    return (
        f'<div class="calm-progress" data-state="{html.escape(view.state)}" '
        f'data-step="{view.step}">'
        f'<progress id="train-progress-bar" max="100" value="{percent:.1f}" '
        f'style="width:100%;height:18px;accent-color:#e07b00"></progress>'
        f'<div id="train-progress-label">{html.escape(label)}</div></div>'
    )


def status_text(view: runs.RunView) -> str:
    if view.state == "none":
        return view.reason or "no run selected: start one, or pick an earlier run"
    text = f"{view.name}: {view.state}"
    if view.state == "starting":
        text += " (loading the models and the data)"
    if view.reason:
        text += f"\n{view.reason}"
    if view.bridge:
        text += f"\nbridge: {view.bridge} (choose it in the Chat tab)"
    return text


def stats_markdown(view: runs.RunView) -> str:
    if not view.records:
        return ""
    last = view.records[-1]
    tps = f"{view.tokens_per_second:,.0f}" if view.tokens_per_second else "—"
    parts = [
        f"loss **{last.get('loss', float('nan')):.4f}**",
        f"epoch {last.get('epoch', 0):.2f}",
        f"lr {last.get('lr', 0):.2e}",
        f"{tps} tokens/s",
        f"peak memory {format_bytes(view.peak_memory_bytes) if view.peak_memory_bytes else '—'}",
        f"elapsed {'—' if view.elapsed_s is None else format_duration(view.elapsed_s)}",
    ]
    evals = [r for r in view.records if "eval_loss" in r]
    if evals:
        before = evals[-1].get("start_eval_loss")
        anchor = f" (anchor alone {before:.4f})" if isinstance(before, (int, float)) else ""
        parts.insert(1, f"eval loss {evals[-1]['eval_loss']:.4f}{anchor}")
    return " · ".join(parts)
