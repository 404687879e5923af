"""Data tab: pick or upload a file; detected format, the first rows as trained on, row errors."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from app.handlers import recipe
from app.session import Session
from app.ui import guard

PREVIEW_HEADERS = ["row", "input as trained on", "tokens with loss", "tokens", "cut", "problem"]
PROBLEM_HEADERS = ["row", "problem"]


def build(session: Session) -> SimpleNamespace:
    with gr.Row():
        path = gr.Textbox(
            label="Training file (.jsonl, .json, .csv, .parquet, .txt)",
            elem_id="data-path",
            scale=4,
        )
        show = gr.Button("Preview", variant="primary", elem_id="preview-data", scale=1)
    known = gr.Dropdown(
        label="or pick a known file (the presets' data and your uploads)",
        choices=recipe.data_files(session),
        value=None,
        elem_id="data-known",
    )
    upload = gr.File(
        label="or upload a file",
        file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt", ".gz"],
        elem_id="data-upload",
    )
    summary = gr.Markdown(elem_id="data-format")
    table = gr.Dataframe(
        headers=PREVIEW_HEADERS,
        label="First rows, as the model sees them",
        interactive=False,
        wrap=True,
        elem_id="data-preview",
    )
    problems = gr.Dataframe(
        headers=PROBLEM_HEADERS,
        label="Rows that will be skipped",
        interactive=False,
        wrap=True,
        elem_id="data-problems",
    )

    def preview(file_path: str) -> tuple[str, list[list[Any]], list[list[Any]]]:
        if not (file_path or "").strip():
            return "No training file chosen yet.", [], []
        recipe.set_data_file(session, file_path)
        view = recipe.preview_data(session, file_path)
        bad = len(view.problems)
        text = f"Detected format: **{view.format}** · {view.rows} row(s) · " + (
            f"**{bad} row(s) will be skipped** (listed below)" if bad else "every row is valid"
        )
        rows = [
            [
                e["row"],
                e["text"],
                " | ".join(e["loss_spans"]),
                e["num_tokens"],
                "yes" if e["truncated"] else "",
                e["problem"] or "",
            ]
            for e in view.preview
        ]
        return text, rows, [[row, message] for row, message in view.problems]

    outputs = [summary, table, problems]
    show.click(guard(preview), path, outputs, api_name="preview_data")
    path.submit(guard(preview), path, outputs, api_name="preview_data_on_submit")

    def uploaded(file: str | None) -> str:
        if not file:
            return gr.skip()
        return recipe.keep_upload(session, file)

    known.input(lambda choice: choice, known, path, api_name="pick_data").then(
        guard(preview), path, outputs, api_name="preview_picked_data"
    )
    upload.upload(guard(uploaded), upload, path, api_name="upload_data").then(
        guard(preview), path, outputs, api_name="preview_uploaded_data"
    )
    return SimpleNamespace(path=path, known=known, outputs=outputs, preview=guard(preview))
