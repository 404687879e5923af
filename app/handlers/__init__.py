"""What every button does, as plain functions of a Session and plain values (no gradio here).

Each handler validates its inputs and raises ``ConfigError`` with a message meant for the page;
the tab builders turn that into a visible message. Heavy libraries (torch, transformers) are
imported inside the handlers that need them, so the app starts fast.

- ``recipe``: presets, the models form, the compatibility report, the data file and its preview
- ``runs``: training runs (separate processes) and what the Train tab shows of them
- ``chat``: the composition in memory and streamed replies
- ``bridges``: save, archive, load and push bridges
"""
