"""The one error family of partc.

Every error is raised for bad input or an impossible request, and its message names the
offender (file, field, layer), what is wrong, and what to do about it. ``cli.main`` prints
the message on one line and exits with ``exit_code``.
"""


class PartcError(Exception):
    """Bad input or an impossible request; the CLI exits with 2."""

    exit_code = 2


class ModelError(PartcError):
    """A MODEL spec that names nothing loadable, or a factory that fails."""


class TraceError(PartcError):
    """A model that neither torch.fx nor torch.export can trace, or rejects its inputs."""


class UnsupportedLayerError(PartcError):
    """A layer that a pass or backend cannot handle."""


class ClusterError(PartcError):
    """A malformed cluster file, or constraints that cannot be met."""


class ManifestError(PartcError):
    """A malformed manifest, or an artifact that is missing or does not match its checksum."""


class RunError(PartcError):
    """A failure at run time (a dead worker, a link that timed out); the CLI exits with 1."""

    exit_code = 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
