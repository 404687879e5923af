"""Which anchor layer reads which specialist layer (pure functions, 0-based layers)."""

from __future__ import annotations

from composer.config import BridgeConfig, ConfigError

LayerPair = tuple[int, int]  # (anchor layer, specialist layer)


def default_pairs(
    *, anchor_layers: int, specialist_layers: int, every: int = 4
) -> tuple[LayerPair, ...]:
    """The paper's pairing: n = specialist_layers // every blocks.

    Specialist side: the output of the last layer of each group of ``every`` layers
    (every-1, 2*every-1, ...). We take the *end* of each group so that, when the depth divides
    evenly, the last block reads the specialist's final layer (its most processed states, before
    its final norm); the paper leaves this offset open.
    Anchor side: n evenly spaced layers chosen the same way (end of each of n equal groups), so
    the last block writes after the anchor's last layer and the first one as deep as the spacing
    allows; layers below the first connected one need no autograd, which keeps training cheap.
    """
    if specialist_layers < every:
        raise ConfigError(
            f"the specialist has {specialist_layers} layers, fewer than bridge.every={every}; "
            f"lower bridge.every to at most {specialist_layers} or give bridge.pairs explicitly"
        )
    n = min(specialist_layers // every, anchor_layers)
    specialist = [every * (k + 1) - 1 for k in range(n)]
    anchor = [round((k + 1) * anchor_layers / n) - 1 for k in range(n)]
    return tuple(zip(anchor, specialist, strict=True))


def check_pairs(
    pairs: tuple[LayerPair, ...], *, anchor_layers: int, specialist_layers: int
) -> None:
    """Raise ConfigError naming the first pair that points past either model's depth."""
    for a, s in pairs:
        if not 0 <= a < anchor_layers:
            raise ConfigError(
                f"bridge pair ({a}, {s}) names anchor layer {a}, but the anchor has layers "
                f"0..{anchor_layers - 1}; fix bridge.pairs"
            )
        if not 0 <= s < specialist_layers:
            raise ConfigError(
                f"bridge pair ({a}, {s}) names specialist layer {s}, but the specialist has layers "
                f"0..{specialist_layers - 1}; fix bridge.pairs"
            )


def resolve_pairs(
    config: BridgeConfig, *, anchor_layers: int, specialist_layers: int
) -> tuple[LayerPair, ...]:
    """Explicit pairs if given (validated against both depths), else the paper's default."""
    if config.pairs is not None:
        check_pairs(config.pairs, anchor_layers=anchor_layers, specialist_layers=specialist_layers)
        return config.pairs
    return default_pairs(
        anchor_layers=anchor_layers, specialist_layers=specialist_layers, every=config.every
    )
