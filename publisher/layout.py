"""The names at the root of a published repository, beside the variant folders.

One list, read by the stages that write these files and by the recipe check that keeps a variant
folder from taking one of their names.
"""

from __future__ import annotations

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
REPORT_NAME = "publish_report.json"
DEVICE_RESULTS_NAME = "device_results.json"
IMAGES_FOLDER = "images"
# Apple's Swift pipeline reads the CLIP tokenizer from these two files beside the models.
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# A language model's repository carries its config and tokenizer, which swift-transformers and transformers read.
LANGUAGE_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")

ROOT_NAMES = (CARD_NAME, RECIPE_NAME, REPORT_NAME, DEVICE_RESULTS_NAME, IMAGES_FOLDER, *TOKENIZER_FILES,
              *LANGUAGE_MODEL_FILES)
