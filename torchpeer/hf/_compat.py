"""transformers is an optional extra: import it through here for one clear error when it is absent."""

from __future__ import annotations

INSTALL_HINT = "pip install -e '.[hf]'"


def require_transformers():
    """The ``transformers`` module, or ImportError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"torchpeer.hf needs the transformers package: {INSTALL_HINT}") from None
    return transformers
