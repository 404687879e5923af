"""Chat tab: streaming replies with Stop and Regenerate, a system prompt, sampling settings,
a bridge on/off switch, and a side-by-side comparison of anchor, specialist and composition."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gradio as gr

from app.handlers import bridges, chat, serve
from app.session import Session
from app.ui import MODEL_GROUP, guard
from composer.config import ConfigError

MODEL_EVENT = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
EMPTY_REPLY = "*(no text: the model ended its reply at once)*"


def build(session: Session) -> SimpleNamespace:
    with gr.Row():
        bridge = gr.Dropdown(
            label="Bridge",
            choices=bridges.bridge_choices(session),
            value=bridges.preferred_bridge(session),  # the preset's shipped bridge when it has one
            allow_custom_value=True,
            elem_id="chat-bridge",
            scale=3,
        )
        engine = gr.Dropdown(
            label="Engine",
            choices=list(chat.ENGINES),
            value="auto",  # llama.cpp for two GGUF files when llama-cpp-python is installed
            elem_id="chat-engine",
            scale=1,
        )
        refresh = gr.Button("Refresh", elem_id="refresh-bridges", scale=1)
        load = gr.Button("Load models", variant="primary", elem_id="load-models", scale=1)
    loaded = gr.Markdown(chat.describe_loaded(session), elem_id="models-status")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Chat", height=360, elem_id="chatbot")
            speed = gr.Markdown("", elem_id="reply-speed")  # engine and tokens/s of each reply
            message = gr.Textbox(
                label="Message", placeholder="Type and press Enter", elem_id="chat-input"
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                stop = gr.Button("Stop", variant="stop", elem_id="stop-chat")
                regenerate = gr.Button("Regenerate", elem_id="regenerate")
                clear = gr.Button("Clear", elem_id="clear-chat")
            examples = chat.example_prompts(session)
            if examples:  # one click puts a held-out prompt in the message box
                gr.Examples(
                    [[text] for text in examples],
                    inputs=[message],
                    label="Examples from the preset's eval data (held-out: not trained on)",
                    elem_id="chat-examples",
                )
        with gr.Column(scale=1):
            system = gr.Textbox(label="System prompt", lines=3, elem_id="system-prompt")
            bridge_on = gr.Checkbox(
                label="Bridge on (off: the anchor alone)", value=True, elem_id="bridge-on"
            )
            start = chat.decoding_defaults(session)  # the recipe's generation section
            max_new = gr.Slider(
                1,
                1024,
                value=start.max_new_tokens,
                step=1,
                label="Max new tokens",
                elem_id="max-new-tokens",
            )
            sample = gr.Checkbox(
                label="Sample (off: greedy)", value=start.do_sample, elem_id="do-sample"
            )
            temperature = gr.Slider(
                0.05,
                2.0,
                value=start.temperature,
                step=0.05,
                label="Temperature",
                elem_id="temperature",
            )
            top_p = gr.Slider(
                0.05, 1.0, value=start.top_p, step=0.05, label="Top-p", elem_id="top-p"
            )
            top_k = gr.Slider(
                0, 200, value=start.top_k, step=1, label="Top-k (0: off)", elem_id="top-k"
            )
            penalty = gr.Slider(
                1.0,
                2.0,
                value=start.repetition_penalty,
                step=0.05,
                label="Repetition penalty",
                elem_id="repetition-penalty",
            )
    with gr.Row():
        serving = gr.Checkbox(
            label="Serve (an OpenAI-compatible API on this machine, for editors and scripts)",
            value=session.server is not None,
            elem_id="serve-api",
            scale=1,
        )
        serve_status = gr.Markdown(serve.serving_status(session)[0], elem_id="serve-url")
    serve_code = gr.Code(
        serve.serving_status(session)[1],
        language="python",
        label="Client snippet (pip install openai)",
        buttons=["copy"],
        lines=8,
        visible=session.server is not None,
        elem_id="serve-snippet",
    )
    with gr.Accordion("Compare: the same prompt, three ways", open=False):
        compare = gr.Button("Compare (uses the message box)", elem_id="compare")
        with gr.Row():
            anchor_out = gr.Textbox(label="Anchor alone", lines=6, elem_id="compare-anchor")
            specialist_out = gr.Textbox(
                label="Specialist alone", lines=6, elem_id="compare-specialist"
            )
            composed_out = gr.Textbox(label="Composition", lines=6, elem_id="compare-composition")

    settings = [system, max_new, sample, temperature, top_p, top_k, penalty, bridge_on]

    def chat_settings(values: tuple[Any, ...]) -> chat.ChatSettings:
        system_prompt, max_new_tokens, do_sample, temp, p, k, rep, on = values
        return chat.ChatSettings(
            system_prompt=system_prompt or "",
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample),
            temperature=float(temp),
            top_p=float(p),
            top_k=int(k),
            repetition_penalty=float(rep),
            bridge=bool(on),
        )

    # The engine is read from its dropdown when a reply needs the models (not an event input,
    # so the chat events keep their API signatures).
    chosen_engine = {"value": "auto"}

    def ensure_loaded(choice: str | None) -> None:
        notice = chat.training_notice(session)
        if notice:
            gr.Warning(notice)
        if chat.needs_loading(session, bridge=choice, engine=chosen_engine["value"]):
            gr.Info("loading the models and the chosen bridge first")
            chat.load_models(session, bridge=choice, engine=chosen_engine["value"])

    def respond(
        history: list[dict[str, Any]] | None, text: str, choice: str | None, *values: Any
    ) -> Iterator[tuple[list[dict[str, str]], str]]:
        messages = chat.flatten_history(history)
        if not (text or "").strip():
            raise ConfigError("type a message first")
        messages.append({"role": "user", "content": text})
        yield [*messages, {"role": "assistant", "content": ""}], ""
        ensure_loaded(choice)
        reply = ""
        for reply in chat.stream_reply(session, messages, chat_settings(values)):
            yield [*messages, {"role": "assistant", "content": reply}], ""
        yield [*messages, {"role": "assistant", "content": reply or EMPTY_REPLY}], ""

    def again(
        history: list[dict[str, Any]] | None, choice: str | None, *values: Any
    ) -> Iterator[list[dict[str, str]]]:
        messages = chat.flatten_history(history)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise ConfigError("nothing to regenerate yet; send a message first")
        ensure_loaded(choice)
        reply = ""
        for reply in chat.stream_reply(session, messages, chat_settings(values)):
            yield [*messages, {"role": "assistant", "content": reply}]
        yield [*messages, {"role": "assistant", "content": reply or EMPTY_REPLY}]

    def side_by_side(text: str, choice: str | None, *values: Any) -> Iterator[tuple[str, str, str]]:
        if not (text or "").strip():
            raise ConfigError("type a message first")
        ensure_loaded(choice)
        config = chat_settings(values)
        messages = [{"role": "user", "content": text}]
        answers = ["", "", ""]
        for k, model in enumerate(("anchor", "specialist", "composition")):
            replies = chat.stream_reply(session, messages, config, model=model, keep_previous=k > 0)
            for answers[k] in replies:
                yield tuple(answers)
        yield tuple(answers)

    def load_models(choice: str | None) -> str:
        return chat.load_models(session, bridge=choice, engine=chosen_engine["value"])

    def choose_engine(value: str | None) -> None:
        chosen_engine["value"] = value or "auto"

    chat_inputs = [chatbot, message, bridge, *settings]
    engine.change(choose_engine, engine, None, api_name="choose_engine", queue=False)

    def show_speed() -> str:
        return chat.reply_stats(session)

    speed_event = {"fn": show_speed, "inputs": None, "outputs": speed, "queue": False}
    send.click(
        guard(respond), chat_inputs, [chatbot, message], api_name="chat", **MODEL_EVENT
    ).then(**speed_event, api_name="speed_after_chat")
    message.submit(
        guard(respond), chat_inputs, [chatbot, message], api_name="chat_on_submit", **MODEL_EVENT
    ).then(**speed_event, api_name="speed_after_submit")
    regenerate.click(
        guard(again), [chatbot, bridge, *settings], chatbot, api_name="regenerate", **MODEL_EVENT
    ).then(**speed_event, api_name="speed_after_regenerate")
    compare.click(
        guard(side_by_side),
        [message, bridge, *settings],
        [anchor_out, specialist_out, composed_out],
        api_name="compare",
        **MODEL_EVENT,
    ).then(**speed_event, api_name="speed_after_compare")
    stop.click(lambda: chat.stop_reply(session), None, None, api_name="stop_chat", queue=False)
    clear.click(lambda: [], None, chatbot, api_name="clear_chat", queue=False)
    load.click(guard(load_models), bridge, loaded, api_name="load_models", **MODEL_EVENT)

    def toggle_serving(on: bool, choice: str | None) -> tuple[str, Any, str]:
        if on:
            ensure_loaded(choice)
        status, snippet = serve.toggle_serving(session, bool(on))
        return status, gr.Code(snippet, visible=bool(snippet)), chat.describe_loaded(session)

    serving.change(
        guard(toggle_serving),
        [serving, bridge],
        [serve_status, serve_code, loaded],
        api_name="serve_api",
        **MODEL_EVENT,
    )

    def refresh_bridges(choice: str | None) -> Any:
        """The choices now; the selection follows what is loaded (e.g. from the Export tab)."""
        choices = bridges.bridge_choices(session)
        values = {value for _, value in choices}
        if session.loaded is not None:
            choice = session.loaded.bridge
        fallback = bridges.preferred_bridge(session)
        known = isinstance(choice, str) and choice in values  # a client may send anything
        return gr.Dropdown(choices=choices, value=choice if known else fallback)

    refresh.click(guard(refresh_bridges), bridge, bridge, api_name="refresh_bridges")
    return SimpleNamespace(
        bridge=bridge,
        loaded=loaded,
        refresh_bridges=guard(refresh_bridges),
        chatbot=chatbot,
        engine=engine,
        speed=speed,
    )
