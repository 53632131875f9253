"""Errors raised by moe_dist. Every user-facing failure is one of these, with a message that names the
offending key, layer or file, never a traceback from deep inside torch."""


class ConfigError(ValueError):
    """A configuration value is invalid (type, range, unknown key, or an impossible combination)."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf met in router logits or the loss; the message names the step and layer."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the MoE layer and stage that issued it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or was written by a different layout."""
