"""Dataset governance and training audit pipeline for Masked Autoencoders."""


class PipelineError(Exception):
    """A user's mistake (bad card, params or input): reported as one line, never as a traceback."""
