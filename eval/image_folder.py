"""A folder of generated images: `settings.json`, `images/*.png` and `metadata.jsonl` (one line per finished image).

An image is written to a temporary name and renamed before its metadata line is appended, so the metadata lists only
complete images and an interrupted run resumes from it. Settings that change the images must match on resume.
"""

import json
import os

from PIL import Image


METADATA = "metadata.jsonl"
SETTINGS = "settings.json"
IMAGES = "images"
# Keys that do not change the images, so a resume may change them.
RUNTIME_KEYS = ("batch_size", "device", "progress")


def read_metadata(folder):
    """Entries of a folder's metadata.jsonl; a torn last line (a crash mid-write) is dropped."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{folder!r} has no {METADATA}: score a folder written by `python -m eval.generate` "
            "(or write one line per image with at least the keys file and prompt)."
        )
    entries = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 2:
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON.") from None
    for entry in entries:
        missing = {"file", "prompt"} - set(entry)
        if missing:
            raise ValueError(f"{path}: an entry lacks {sorted(missing)}: {entry}")
    return entries


def load_image(folder, entry):
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Image {path!r} listed in {os.path.join(folder, METADATA)} is missing: regenerate "
            "it (eval.generate resumes and redraws only missing images) or remove its line."
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # truncated or not an image (eval.generate writes atomically; this is outside damage)
        raise ValueError(
            f"Image {path!r} cannot be read ({error}): delete it and its line in "
            f"{os.path.join(folder, METADATA)}, or rerun eval.generate after deleting the file (it redraws "
            "missing images)."
        ) from error


def image_key(entry):
    """The identity of an image across runs: same prompt index, same image index (hence the same seed)."""
    return int(entry["prompt_index"]), int(entry.get("image_index", 0))


class ImageFolderWriter:
    def __init__(self, folder, settings):
        self.folder = folder
        os.makedirs(os.path.join(folder, IMAGES), exist_ok=True)
        self._check_settings(settings)
        self.done = set()
        if os.path.exists(os.path.join(folder, METADATA)):
            entries = [e for e in read_metadata(folder) if os.path.exists(os.path.join(folder, e["file"]))]
            self._rewrite(entries)
            self.done = {image_key(entry) for entry in entries}

    def _check_settings(self, settings):
        path = os.path.join(self.folder, SETTINGS)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            changed = sorted(
                key
                for key in set(previous) | set(settings)
                if key not in RUNTIME_KEYS and previous.get(key) != settings.get(key)
            )
            if changed:
                details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{self.folder!r} holds images made with other settings ({details}). Resume with "
                    "the same settings or choose a new --out folder."
                )
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, sort_keys=True)

    def _rewrite(self, entries):
        path = os.path.join(self.folder, METADATA)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)
        os.replace(path + ".tmp", path)

    def add(self, entry, image):
        name = f"{int(entry['prompt_index']):05d}_{int(entry.get('image_index', 0))}.png"
        relative = os.path.join(IMAGES, name)
        target = os.path.join(self.folder, relative)
        image.save(target + ".tmp.png")
        os.replace(target + ".tmp.png", target)
        with open(os.path.join(self.folder, METADATA), "a", encoding="utf-8") as f:
            f.write(json.dumps({"file": relative, **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(image_key(entry))
