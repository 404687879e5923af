"""Export tab: save the bridge folder, download it as one archive, load a bridge (refused, with
the reason, when it does not fit the loaded models), push it to the Hugging Face hub."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.handlers import bridges
from app.session import Session
from app.ui import MODEL_GROUP, guard

MODEL_EVENT = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}


def build(session: Session) -> SimpleNamespace:
    gr.Markdown(
        "The bridge is the only trained part: a few files (`bridge.safetensors`, "
        "`bridge_config.json`, `composition.yaml`, `README.md`), no model weights."
    )
    with gr.Row():
        folder = gr.Textbox(
            label=f"Bridge folder (empty: a new folder under {session.exports_dir})",
            elem_id="export-folder",
            scale=3,
        )
        save = gr.Button("Save bridge", variant="primary", elem_id="save-bridge", scale=1)
        download = gr.Button("Download archive", elem_id="download-bridge", scale=1)
    archive = gr.File(label="Archive", interactive=False, elem_id="bridge-archive")
    with gr.Accordion("Load a bridge onto the loaded models", open=False):
        with gr.Row():
            load_folder = gr.Textbox(label="Bridge folder", elem_id="load-folder", scale=3)
            load_archive = gr.File(
                label="or an archive (.zip, .tar.gz)",
                file_types=[".zip", ".tar", ".gz", ".tgz"],
                elem_id="load-archive",
                scale=2,
            )
        load = gr.Button("Load bridge", elem_id="load-bridge")
    with gr.Accordion("Push to the Hugging Face hub", open=False):
        token = "configured" if bridges.hub_token() else "not configured (`hf auth login`)"
        gr.Markdown(f"Hugging Face token: {token}.")
        with gr.Row():
            repo = gr.Textbox(label="Repository (owner/name)", elem_id="hub-repo", scale=3)
            private = gr.Checkbox(label="Private", value=True, elem_id="hub-private")
            push_button = gr.Button("Push", elem_id="push-hub")
    status = gr.Textbox(label="Result", interactive=False, elem_id="export-status")

    def save_bridge(target: str) -> tuple[str, str]:
        path = bridges.save_bridge(session, target)
        return f"saved the bridge to {path}", path

    def archive_bridge(target: str) -> tuple[str, str]:
        path = bridges.archive_bridge(session, target)
        return path, f"archive ready: {path}"

    def load_bridge(target: str, upload: str | None) -> str:
        return bridges.load_bridge(session, folder=target, archive=upload)

    def push(target: str, repo_id: str, is_private: bool) -> str:
        url = bridges.push_to_hub(session, folder=target, repo_id=repo_id, private=is_private)
        return f"pushed to {url}"

    save.click(guard(save_bridge), folder, [status, folder], api_name="save_bridge", **MODEL_EVENT)
    download.click(
        guard(archive_bridge), folder, [archive, status], api_name="archive_bridge", **MODEL_EVENT
    )
    load.click(
        guard(load_bridge),
        [load_folder, load_archive],
        status,
        api_name="load_bridge",
        **MODEL_EVENT,
    )
    push_button.click(
        guard(push), [folder, repo, private], status, api_name="push_to_hub", **MODEL_EVENT
    )
    return SimpleNamespace(status=status, folder=folder)
