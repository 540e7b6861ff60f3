"""Typed errors. Their messages name the offending client, module or tensor and say what follows."""


class AdapterError(ValueError):
    """An adapter directory or client update is malformed; it is refused and nothing is changed."""


class AggregationError(ValueError):
    """Client updates cannot be combined by the chosen method (e.g. FedAvg over different ranks)."""


class EnvironmentFailure(RuntimeError):
    """The machine, not the input, is at fault (a model package missing, an unusable cache); exit code 1."""
