"""Components: what the project knows about each Core ML component, in one table.

Every stage reads this table instead of keeping its own list: the recipe's schema, the source's
model folders, conversion, parity, the card, the compiled resources of the macOS job and ``plan``.
Adding a component is one entry here plus its torch wrapper and I/O contract in
:mod:`publisher.wrappers` (registered there by name; a test checks that every entry has both); the language
model's, one stateful program with ranged inputs, are :mod:`publisher.language_model`'s.

The names follow Apple's ml-stable-diffusion: its package suffixes
(``Stable_Diffusion_version_<model>_<suffix>.mlpackage``) and the resource names its Swift pipeline
loads compiled models under (``StableDiffusionPipeline+Resources.swift``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Role = Literal["text_encoder", "denoiser", "vae", "controlnet", "safety_checker", "language_model"]

# Apple's chunked UNets (--chunk-unet): two packages, loaded as <Resource>Chunk1 / <Resource>Chunk2.
CHUNKS = ("chunk1", "chunk2")
# A ControlNet's package is ControlNet_<model id, / -> _>.mlpackage; Swift loads it from controlnet/.
CONTROLNET_PACKAGE_PREFIX = "ControlNet_"
CONTROLNET_FOLDER = "controlnet"


@dataclass(frozen=True)
class ComponentSpec:
    """One convertible component.

    Attributes:
        name (`str`):
            The name recipes use (``conversion.components``, ``compression.<name>``).
        role (`str`):
            ``text_encoder``, ``denoiser`` (UNet-like: takes latents and text), ``vae``, ``controlnet``,
            ``safety_checker``, or ``language_model`` (a causal LM with its KV cache as state: the whole
            model of a ``text-generation`` recipe, :mod:`publisher.language_model`).
        model (`str`):
            The source model its weights come from: a diffusers pipeline folder (``vae`` holds both VAE
            halves), or ``controlnet`` (the recipe's ``source.controlnet``).
        package_suffix (`str`, *optional*):
            Apple's package suffix; ``None`` for a ControlNet, published as ``ControlNet_<model id>``.
        swift_resource (`str`, *optional*):
            The compiled model's name in Apple's Swift resources; ``None`` for a ControlNet, compiled to
            ``controlnet/<Name>.mlmodelc`` after its model (see `swift_resource`).
        traced_small (`bool`):
            Traced on small inputs and converted at the recipe's size (convolutional, shape-agnostic trace).
        in_images (`bool`):
            Run by the end-to-end text-to-image check (when the source has its model).
        default (`bool`):
            Converted when a recipe does not list its components.
        chunkable (`bool`):
            Split in two packages by ``conversion.chunk_unet``, as Apple's ``--chunk-unet`` splits its UNets.
        optional (`bool`):
            A default component only for sources that have its model (a recipe listing it needs one).
        compress_embeddings (`bool`):
            Its embedding tables (``gather`` weights) are compressed with the rest. Apple leaves CLIP's uncompressed;
            a language model's is a fifth of its weights, and tied, the same constant as its LM head.
    """

    name: str
    role: Role
    model: str
    package_suffix: str | None
    swift_resource: str | None
    traced_small: bool = False
    in_images: bool = False
    default: bool = False
    chunkable: bool = False
    optional: bool = False
    compress_embeddings: bool = False

    @property
    def is_denoiser(self) -> bool:
        """Denoisers (and ControlNets) take latents and text conditioning; their attention varies by variant."""
        return self.role in ("denoiser", "controlnet")


TABLE: dict[str, ComponentSpec] = {
    entry.name: entry
    for entry in (
        ComponentSpec("text_encoder", "text_encoder", "text_encoder", "text_encoder", "TextEncoder", in_images=True,
                      default=True),
        ComponentSpec("text_encoder_2", "text_encoder", "text_encoder_2", "text_encoder_2", "TextEncoder2",
                      in_images=True),
        ComponentSpec("unet", "denoiser", "unet", "unet", "Unet", in_images=True, default=True, chunkable=True),
        ComponentSpec("vae_decoder", "vae", "vae", "vae_decoder", "VAEDecoder", traced_small=True, in_images=True,
                      default=True),
        ComponentSpec("vae_encoder", "vae", "vae", "vae_encoder", "VAEEncoder", traced_small=True, default=True),
        ComponentSpec("controlnet", "controlnet", "controlnet", None, None),
        ComponentSpec("control_unet", "denoiser", "unet", "control-unet", "ControlledUnet", chunkable=True),
        # Apple's Python pipeline loads it whenever the source pipeline has one, and fails without it.
        ComponentSpec("safety_checker", "safety_checker", "safety_checker", "safety_checker", "SafetyChecker",
                      default=True, optional=True),
        # swift-transformers loads any compiled package path an app gives it; the package is named after the
        # model, as Apple's StatefulMistral7BInstructInt4.mlpackage is (see publisher.language_model).
        ComponentSpec("language_model", "language_model", "language_model", None, None, compress_embeddings=True),
    )
}
NAMES = tuple(TABLE)


def component_spec(name: str) -> ComponentSpec:
    """The table entry of ``name`` (a chunk, ``unet_chunk1``, is its whole component's)."""
    return TABLE[whole_component(name)]


def component_names(role: Role | None = None, *, in_images: bool | None = None, default: bool | None = None,
                    chunkable: bool | None = None) -> tuple[str, ...]:
    """Component names in table order; those of one role, of the image check, converted by default or chunkable."""
    return tuple(name for name, entry in TABLE.items()
                 if (role is None or entry.role == role) and (in_images is None or entry.in_images == in_images)
                 and (default is None or entry.default == default)
                 and (chunkable is None or entry.chunkable == chunkable))


def chunk_names(name: str) -> tuple[str, ...]:
    """Apple's names for a chunked component's packages: ``unet_chunk1``, ``unet_chunk2``."""
    return tuple(f"{name}_{chunk}" for chunk in CHUNKS)


def whole_component(name: str) -> str:
    """``unet`` for ``unet_chunk1`` and ``unet_chunk2``; any other name for itself."""
    for chunk in CHUNKS:
        if name.endswith(f"_{chunk}"):
            return name.removesuffix(f"_{chunk}")
    return name


def swift_resource(name: str, package: str = "") -> str:
    """The compiled resource Swift loads for a package of ``name``: ``Unet``, ``UnetChunk1``,
    ``ControlledUnetChunk2``.

    A language model's is its package's name: swift-transformers compiles and loads whatever package an app
    names. A ControlNet's is ``controlnet/<Name>``, ``<Name>`` the model name in its package's file name (``package``)
    title-cased word by word: Apple's ``bundle_resources_for_swift_cli`` compiles it so, and an app passes
    that name to the Swift pipeline, which loads ``controlnet/<Name>.mlmodelc``.
    """
    spec = component_spec(name)
    if spec.role == "language_model":
        return package.rsplit("/", 1)[-1].removesuffix(".mlpackage")
    if spec.swift_resource is None:
        model_name = package.rsplit("/", 1)[-1].removeprefix(CONTROLNET_PACKAGE_PREFIX).removesuffix(".mlpackage")
        if not model_name:
            raise ValueError(f"the compiled name of a {name} package comes from its file name: give it")
        return CONTROLNET_FOLDER + "/" + "".join(word.title() for word in re.split("[_-]", model_name))
    if name == whole_component(name):
        return spec.swift_resource
    return spec.swift_resource + name.removeprefix(whole_component(name) + "_").capitalize()


def package_suffix(name: str) -> str:
    """Apple's suffix of a package of ``name`` (``unet``, ``unet_chunk1``, ``control-unet_chunk2``)."""
    suffix = component_spec(name).package_suffix
    if suffix is None:
        raise ValueError(f"a {name} package is named after its model (ControlNet_<model>), not a suffix")
    return suffix + name.removeprefix(whole_component(name))


def pipeline_components(models: Iterable[str], *, controlled: bool, refines: bool = False) -> tuple[str, ...]:
    """What Apple's pipelines load for a source holding ``models`` (pipeline folders): every text encoder it
    has, the denoiser (the control-unet and a ControlNet when ``controlled``), the VAE decoder (and the encoder
    for a pipeline that ``refines`` an image, the SDXL refiner) and the safety checker it has."""
    models = set(models)
    denoisers = tuple(name for name, entry in TABLE.items()
                      if (entry.role == "controlnet" or entry.name == "control_unet") == controlled
                      and entry.role in ("denoiser", "controlnet"))
    return (*(name for name in component_names("text_encoder") if TABLE[name].model in models), *denoisers,
            *(name for name in component_names("vae", in_images=True)),
            *(component_names("vae", in_images=False) if refines else ()),
            *(name for name in component_names("safety_checker") if TABLE[name].model in models))
