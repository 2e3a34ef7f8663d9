"""Prompt sets by name (each with its documented source and expected size) or from a local .txt/.jsonl/.csv file."""

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PromptSet:
    name: str
    hub_id: str
    split: str
    column: str
    expected_count: int
    description: str
    category_column: Optional[str] = None


PROMPT_SETS = {
    "pickapic_test": PromptSet(
        "pickapic_test",
        "yuvalkirstain/pickapic_v2_no_images",
        "test_unique",
        "caption",
        500,
        "Pick-a-Pic v2 test set, one row per unique prompt (the Diffusion-DPO evaluation prompts).",
    ),
    "partiprompts": PromptSet(
        "partiprompts",
        "nateraw/parti-prompts",
        "train",
        "Prompt",
        1632,
        "PartiPrompts (Yu et al. 2022), all 1632 prompts; `Category` kept per prompt.",
        category_column="Category",
    ),
    "hpsv2": PromptSet(
        "hpsv2",
        "zhwang/HPDv2",
        "benchmark/{style}.json",
        "(a JSON list of strings per style)",
        3200,
        "HPSv2 benchmark prompts: anime, concept-art, paintings, photo, 800 each, from the files the hpsv2 package "
        "downloads (dataset repo zhwang/HPDv2, benchmark/<style>.json); the style is kept as the category.",
    ),
    "drawbench": PromptSet(
        "drawbench",
        "sayakpaul/drawbench",
        "train",
        "Prompts",
        200,
        "DrawBench (Saharia et al. 2022), 200 prompts; `Category` kept per prompt.",
        category_column="Category",
    ),
}

HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv")


def load_prompts(name_or_path, source=None, column=None, max_prompts=None):
    """A list of {"prompt": str, "category": str | None}.

    `name_or_path` is a key of PROMPT_SETS or a local file. `source` replaces a named set's Hub id with a local copy in
    the same layout (a folder or file `datasets` loads); `column` picks the prompt column of a local .jsonl/.csv.
    """
    if name_or_path in PROMPT_SETS:
        records = _load_named_set(PROMPT_SETS[name_or_path], source)
    elif os.path.isfile(name_or_path):
        records = _load_local_file(name_or_path, column)
    else:
        raise ValueError(
            f"Unknown prompt set {name_or_path!r}: pass one of {sorted(PROMPT_SETS)} or an existing "
            f"{'/'.join(LOCAL_SUFFIXES)} file."
        )
    if not records:
        raise ValueError(f"No prompts in {name_or_path!r}: the file is empty or every line is blank.")
    return records[:max_prompts] if max_prompts else records


def _unreachable(prompt_set, location, error):
    return ValueError(
        f"Cannot load prompt set {prompt_set.name!r} from {location!r} ({prompt_set.split}, {prompt_set.column}): "
        f"{error}. It needs the Hugging Face Hub; offline, download it elsewhere and pass --prompts_source <local "
        "copy>, or pass a local .txt/.jsonl/.csv file as --prompts."
    )


def _check_count(prompt_set, location, records):
    if len(records) != prompt_set.expected_count:
        raise ValueError(
            f"Prompt set {prompt_set.name!r} from {location!r} has {len(records)} prompts, expected "
            f"{prompt_set.expected_count}: the source changed or is not the documented one."
        )
    return records


def _load_hpsv2(prompt_set, source=None):
    """The four benchmark/<style>.json files, from a local folder (holding them or a benchmark/ folder) or the Hub."""
    records = []
    for style in HPSV2_STYLES:
        relative = prompt_set.split.format(style=style)
        try:
            if source is not None:
                candidates = [os.path.join(source, relative), os.path.join(source, os.path.basename(relative))]
                path = next((c for c in candidates if os.path.isfile(c)), None)
                if path is None:
                    raise FileNotFoundError(f"neither of {candidates} exists")
            else:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(prompt_set.hub_id, relative, repo_type="dataset")
        except Exception as error:
            raise _unreachable(prompt_set, source or prompt_set.hub_id, error) from error
        with open(path, encoding="utf-8") as f:
            records.extend({"prompt": prompt, "category": style} for prompt in json.load(f))
    return _check_count(prompt_set, source or prompt_set.hub_id, records)


def _load_named_set(prompt_set, source=None):
    import datasets

    if prompt_set.name == "hpsv2":
        return _load_hpsv2(prompt_set, source)
    location = source or prompt_set.hub_id
    try:
        dataset = datasets.load_dataset(location, split=prompt_set.split)
    except Exception as error:
        raise _unreachable(prompt_set, location, error) from error
    if prompt_set.column not in dataset.column_names:
        raise ValueError(
            f"Prompt set {prompt_set.name!r} from {location!r} has no column {prompt_set.column!r} "
            f"(columns: {dataset.column_names})."
        )
    prompts = dataset[prompt_set.column]
    categories = (
        dataset[prompt_set.category_column]
        if prompt_set.category_column in dataset.column_names
        else [None] * len(prompts)
    )
    return _check_count(prompt_set, location, [{"prompt": p, "category": c} for p, c in zip(prompts, categories)])


def _load_local_file(path, column=None):
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            return [{"prompt": line.strip(), "category": None} for line in f if line.strip()]
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"Prompt file {path!r} must end in one of {LOCAL_SUFFIXES}.")
    column = column or "prompt"
    if rows and column not in rows[0]:
        raise ValueError(
            f"Prompt file {path!r} has no column {column!r} (columns: {sorted(rows[0])}); pass --prompt_column <name>."
        )
    records = [{"prompt": str(row[column]).strip(), "category": row.get("category")} for row in rows]
    return [record for record in records if record["prompt"]]
