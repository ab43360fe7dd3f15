"""Check a local source's files before any work: every file the run reads parses, and every weight file is whole.

Without this, diffusers and transformers find a broken source late and in their own words: a JSON
traceback, a tokenizer's ValueError, a truncated weight file after the UNet was converted and
compressed. The checks read configs and the headers of weight files only, so `validate` runs them
in well under a second even for SDXL. For the same reason diffusers, transformers and safetensors are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from publisher.components import TABLE, component_names
from publisher.errors import RecipeError
from publisher.recipe import Recipe

# The CLIP tokenizer's files, which Apple's Swift pipeline also reads beside the models.
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# transformers >= 5 saves only this: the same vocabulary and merges, in its BPE model.
FAST_TOKENIZER_FILE = "tokenizer.json"
CONTROLNET_CLASS = "ControlNetModel"
# The pipeline models a run loads weights for; others (an image encoder) are only ever built from their config.
WEIGHTED_MODELS = frozenset(spec.model for spec in TABLE.values()) - {"controlnet"}
TEXT_ENCODERS = tuple(TABLE[name].model for name in component_names("text_encoder"))
REFETCH = "download or save it again"


def refuse(path: Path | str, problem: str, fix: str, line: int | None = None) -> RecipeError:
    """The one-line error for a broken source file: ``path[:line]: problem; fix``.

    Args:
        path (`Path` or `str`):
            The file or folder at fault.
        problem (`str`):
            What is wrong with it.
        fix (`str`):
            What the user can do about it.
        line (`int`, *optional*):
            The line in ``path`` where the problem is.

    Returns:
        [`~publisher.errors.RecipeError`]: the error to raise (exit code 2).
    """
    return RecipeError(f"{path}{f':{line}' if line else ''}: {problem}; {fix}")


def check_source(recipe: Recipe, snapshot: Path | None = None) -> dict[str, Any] | None:
    """Check the recipe's local folders (pipeline, separate VAE, ControlNet) as the loaders will read them.

    Every component of the pipeline needs its folder and its config; the models a run loads need
    whole safetensors weights (a pickle is refused: unpickling runs code from the file); the
    tokenizer needs ``vocab.json`` and ``merges.txt``, or a ``tokenizer.json`` holding them.

    Args:
        recipe (`Recipe`):
            The validated recipe, its paths resolved.
        snapshot (`Path`, *optional*):
            The downloaded configs and tokenizer of a Hub pipeline, checked like a local pipeline except
            for its weights, which are downloaded only when a stage loads them. Without it, a Hub
            pipeline is not checked (offline, `validate` cannot read it).

    Returns:
        `dict` or `None`: the pipeline's ``model_index.json``, or None for an unchecked Hub pipeline.

    Raises:
        [`~publisher.errors.RecipeError`]:
            One line naming the broken file, the problem and the fix.
    """
    source = recipe.source
    pipeline = snapshot or source.path
    folders: dict[str, Path] = {}
    configs: dict[str, dict[str, Any]] = {}
    index = None
    classes: dict[str, type] = {}
    if pipeline is not None:
        index = read_json(pipeline / "model_index.json")
        classes = _check_model_index(index, pipeline / "model_index.json", _passed(recipe))
        for name, cls in classes.items():
            if name not in _passed(recipe):
                folders[name] = pipeline / name
                configs[name] = _check_component(folders[name], cls,
                                                 weights=snapshot is None and name in WEIGHTED_MODELS)
    separate = {"vae": (source.vae, classes.get("vae") or library_class("diffusers", "AutoencoderKL")),
                "controlnet": (source.controlnet, library_class("diffusers", CONTROLNET_CLASS))}
    for name, (origin, cls) in separate.items():
        if origin is not None and origin.path is not None and not origin.is_single_file:  # a file: checkpoint.py
            folders[name] = origin.path
            configs[name] = _check_component(origin.path, cls, weights=True)
    _check_cross_attention(folders, configs)
    return index


def _passed(recipe: Recipe) -> set[str]:
    """The components the loader is given instead of reading them from the pipeline's folders: the safety
    checker unless it is converted, and the VAE when the recipe names its own."""
    passed = {"vae"} if recipe.source.vae is not None else set()
    return passed | (set() if "safety_checker" in recipe.conversion.components else {"safety_checker"})


def _check_model_index(index: Any, path: Path, passed: set[str]) -> dict[str, type]:
    """Check that ``model_index.json`` names a diffusers pipeline and the classes of all its required components.

    Args:
        index (`Any`):
            The parsed ``model_index.json``.
        path (`Path`):
            Where it was read from, for the error message.
        passed (`set[str]`):
            Components the loader is given instead of reading them from the pipeline: they may be absent.

    Returns:
        `dict[str, type]`: each component present in the pipeline -> its class.

    Raises:
        [`~publisher.errors.RecipeError`]:
            The index is not a mapping, names an unknown pipeline, library or class, or lacks a required component.
    """
    from diffusers import DiffusionPipeline

    if not isinstance(index, dict):
        raise refuse(path, "is not a JSON object", REFETCH)
    pipeline = library_class("diffusers", index.get("_class_name"))
    if not (isinstance(pipeline, type) and issubclass(pipeline, DiffusionPipeline)):
        raise refuse(path, f"_class_name: {index.get('_class_name')!r} is not a diffusers pipeline",
                     'name the pipeline class, e.g. "StableDiffusionPipeline"')
    expected, _ = pipeline._get_signature_keys(pipeline)
    classes = {}
    for name in expected:
        spec = index.get(name, [None, None])
        if not (isinstance(spec, list) and len(spec) == 2):
            raise refuse(path, f"{name}: {spec!r} is not a [library, class] pair",
                         'write it as ["diffusers", "UNet2DConditionModel"] does')
        if spec == [None, None]:
            if name not in pipeline._optional_components and name not in passed:
                raise refuse(path, f"{name}: {pipeline.__name__} needs a {name}, and none is listed",
                             f"add its [library, class] and its {name} folder")
            continue
        library, class_name = spec
        cls = library_class(library, class_name)
        if cls is None:
            raise refuse(path, f"{name}: unknown class {class_name!r} in library {library!r}",
                         "name a diffusers or transformers class, as the library saved it")
        classes[name] = cls
    if not {"tokenizer", "tokenizer_2"} & set(classes):  # the published repo ships the CLIP tokenizer's files
        raise refuse(path, "lists no tokenizer", 'add "tokenizer": ["transformers", "CLIPTokenizer"] and its folder')
    return classes


def read_json(path: Path) -> Any:
    """Parse a JSON file the run reads, or refuse it with its line.

    Args:
        path (`Path`):
            The file.

    Returns:
        `Any`: its content.

    Raises:
        [`~publisher.errors.RecipeError`]:
            The file is missing, unreadable, not UTF-8 or not JSON.
    """
    if not path.is_file():
        raise refuse(path, "is missing", REFETCH)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise refuse(path, f"invalid JSON: {exc.msg} at column {exc.colno}", REFETCH, line=exc.lineno) from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise refuse(path, f"cannot be read as JSON text ({exc})", REFETCH) from None


def _config(path: Path) -> dict[str, Any]:
    config = read_json(path)
    if not isinstance(config, dict):
        raise refuse(path, "is not a JSON object", REFETCH)
    return config


def library_class(library: Any, class_name: Any) -> type | None:
    """The class a pipeline component names, resolved as diffusers does: in diffusers, transformers, or a
    diffusers pipeline module (``["stable_diffusion", "StableDiffusionSafetyChecker"]``); None if unknown.

    Other libraries are not imported: a model index must not make the run import arbitrary code.
    """
    import diffusers
    import diffusers.pipelines
    import transformers

    if not (isinstance(library, str) and isinstance(class_name, str)):
        return None
    modules = {"diffusers": diffusers, "transformers": transformers}
    module = modules.get(library) or getattr(diffusers.pipelines, library, None)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls if isinstance(cls, type) else None


def _check_component(folder: Path, cls: type, *, weights: bool) -> dict[str, Any]:
    """Check one component's folder as its class loads it; returns its config (empty if it has none)."""
    import diffusers
    import transformers

    if not folder.is_dir():
        raise refuse(folder, f"is missing: the pipeline's {cls.__name__} has no folder", REFETCH)
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        check_tokenizer(folder)
        return {}
    if issubclass(cls, transformers.PreTrainedModel):
        path = folder / transformers.utils.CONFIG_NAME
        config = _config(path)
        # AutoConfig picks the config class from model_type; another type builds a model the weights do not fit.
        model_type = cls.config_class.model_type
        if config.get("model_type") != model_type:
            given = f"is {config['model_type']!r}" if "model_type" in config else "is missing"
            raise refuse(path, f'"model_type" {given}; {cls.__name__} needs "{model_type}"',
                         f'set "model_type": "{model_type}" if this is its config')
    elif issubclass(cls, diffusers.ConfigMixin):  # diffusers models and schedulers
        config = _config(folder / cls.config_name)
    else:  # feature extractors and the like: the run never reads them
        return {}
    if weights and issubclass(cls, (transformers.PreTrainedModel, diffusers.ModelMixin)):
        for file in _weight_files(folder, cls):
            _check_safetensors(file)
    return config


def check_tokenizer(folder: Path) -> list[Path]:
    """Check a CLIP tokenizer folder: its vocabulary, merges and length exist, and its JSON files parse.

    The vocabulary and merges are ``vocab.json`` and ``merges.txt`` (transformers 4), or the BPE model of
    ``tokenizer.json`` (transformers 5 saves only that).

    Args:
        folder (`Path`):
            The tokenizer's folder.

    Returns:
        `list[Path]`: ``vocab.json`` and ``merges.txt`` when the folder has both, else ``tokenizer.json``, from which
        the published repository's files are derived.

    Raises:
        [`~publisher.errors.RecipeError`]:
            The vocabulary, the merges or the tokenizer's length is missing, or a JSON file does not parse.
    """
    for path in sorted(folder.glob("*.json")):
        read_json(path)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if not missing:
        files = [folder / name for name in TOKENIZER_FILES]
    elif (folder / FAST_TOKENIZER_FILE).is_file():
        files = [folder / FAST_TOKENIZER_FILE]
        _check_bpe_model(files[0])
    else:
        raise refuse(folder / missing[0],
                     f"is missing: the CLIP tokenizer needs {' and '.join(TOKENIZER_FILES)}, or {FAST_TOKENIZER_FILE}",
                     f"add {' and '.join(missing)} from the model's tokenizer")
    # Without it the tokenizer's length is unbounded (1e30), and the text encoder and UNet are converted for it.
    config_path = folder / "tokenizer_config.json"
    if not isinstance(_config(config_path).get("model_max_length"), int):
        raise refuse(config_path, '"model_max_length" is missing or not a number',
                     "set it to the text encoder's max_position_embeddings (77 for CLIP)")
    return files


def _check_bpe_model(path: Path) -> None:
    """The published ``vocab.json`` and ``merges.txt`` are derived from the BPE model's ``vocab`` and ``merges``."""
    model = _config(path).get("model")
    if not (isinstance(model, dict) and model.get("type") == "BPE"
            and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list)):
        raise refuse(path, '"model" is not a BPE model with a "vocab" and "merges"',
                     "save the CLIP tokenizer again, or add its vocab.json and merges.txt")
    for rank, merge in enumerate(model["merges"]):
        # tokenizers < 0.20 saves a merge as "a b", later versions as ["a", "b"].
        if not (isinstance(merge, str) and " " in merge
                or isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge)):
            raise refuse(path, f'"model.merges" item {rank} is {merge!r}, not a pair of symbols',
                         "save the CLIP tokenizer again, or add its vocab.json and merges.txt")


def _weight_files(folder: Path, cls: type) -> list[Path]:
    """The safetensors files the loader reads for ``cls`` in ``folder``: one file, or the shards of its index."""
    import diffusers.utils
    import transformers.utils

    if issubclass(cls, diffusers.ModelMixin):
        names = (diffusers.utils.SAFETENSORS_WEIGHTS_NAME, diffusers.utils.SAFE_WEIGHTS_INDEX_NAME,
                 diffusers.utils.WEIGHTS_NAME, diffusers.utils.WEIGHTS_INDEX_NAME)
    else:
        names = (transformers.utils.SAFE_WEIGHTS_NAME, transformers.utils.SAFE_WEIGHTS_INDEX_NAME,
                 transformers.utils.WEIGHTS_NAME, transformers.utils.WEIGHTS_INDEX_NAME)
    single, index_name, *pickle_names = names
    if (folder / single).is_file():
        return [folder / single]
    if (folder / index_name).is_file():
        return _shards(folder / index_name)
    pickles = [folder / name for name in pickle_names if (folder / name).is_file()]
    if pickles:
        raise refuse(pickles[0], "is a pickle, the only weights here, and unpickling runs code from the file",
                     f"convert it where you trust it: {cls.__name__}.from_pretrained(folder).save_pretrained(folder) "
                     f"writes {single}")
    variants = sorted(folder.glob("*.safetensors"))
    if variants:
        raise refuse(variants[0], f"is a variant, and a recipe loads no variant: the loader reads {single}",
                     f"rename it to {single}")
    raise refuse(folder, f"has no weights ({single} or {index_name})", f"add {single} or download the folder again")


def _shards(index_path: Path) -> list[Path]:
    weight_map = _config(index_path).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(s, str) for s in weight_map.values())):
        raise refuse(index_path, '"weight_map" is not a mapping of tensor names to shard files', REFETCH)
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index_path.parent / name
        if Path(name).name != name:  # the loaders would read any path it names
            raise refuse(index_path, f"weight_map: shard {name!r} is not a file in its folder", REFETCH)
        if not shard.is_file():
            raise refuse(shard, f"is missing (listed in {index_path.name})", REFETCH)
        shards.append(shard)
    return shards


def _check_safetensors(path: Path) -> None:
    """The safetensors reader checks the 8-byte header length, the JSON header, and that the tensors' byte
    ranges cover the file exactly (a truncated file fails); it maps the file and reads no tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise refuse(path, f"is truncated or damaged ({exc}, {path.stat().st_size} bytes)", REFETCH) from None


def _check_cross_attention(folders: dict[str, Path], configs: dict[str, dict[str, Any]]) -> None:
    """The UNet (and a ControlNet) attend to the text encoders' hidden states, concatenated in SDXL."""
    widths = [configs[name].get("hidden_size") for name in TEXT_ENCODERS if name in configs]
    if not widths or not all(isinstance(width, int) for width in widths):
        return
    for name in dict.fromkeys(spec.model for spec in TABLE.values() if spec.is_denoiser):
        dim = configs.get(name, {}).get("cross_attention_dim")
        if isinstance(dim, int) and dim != sum(widths):
            raise refuse(folders[name] / "config.json",
                         f"cross_attention_dim is {dim}, but the text encoders' hidden_size adds up to {sum(widths)}",
                         "take the text encoders and the denoiser from the same model")
