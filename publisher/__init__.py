"""coreml-publisher: Stable Diffusion checkpoints and causal language models -> verified Core ML repositories on
the Hub."""

__version__ = "0.1.0"
# The package metadata key naming the tool that made a package (Apple's packages carry
# com.github.apple.ml-stable-diffusion.version for theirs).
VERSION_KEY = "com.github.coreml-publisher.version"
