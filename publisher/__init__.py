"""coreml-publisher: Stable Diffusion checkpoints -> verified Core ML repositories on the Hub."""

__version__ = "0.1.0"
