"""Glue between plain handlers and gradio: error messages in the page, and small formatters."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from composer.config import ConfigError

logger = logging.getLogger(__name__)

MODEL_GROUP = "model"  # every event that uses the loaded models runs in this one queue


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _as_page_error(exc: Exception, name: str) -> gr.Error:
    if isinstance(exc, ConfigError):
        return gr.Error(str(exc), title="Cannot do that", print_exception=False)
    logger.exception("unexpected error in %s", name)
    return gr.Error(f"{one_line(exc)} (the traceback is in the app's log)", print_exception=False)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show user errors (ConfigError) as a message in the page; log anything else with its
    traceback and show it as one line. Works for plain and generator functions."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise _as_page_error(exc, fn.__name__) from None

        return generator

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise _as_page_error(exc, fn.__name__) from None

    return plain
