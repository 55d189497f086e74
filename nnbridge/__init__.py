"""nnbridge: torch networks as batched dynamics for trajopt (network training as optimal
control).  The optimizers arrive with later issues; this package currently only marks
its place in the distribution."""

__version__ = "0.1.0"
__all__: list[str] = []
