"""The toy world's rewards for online_rpo.py ("demo.online:hidden_reward"), and the online-vs-offline evidence.

    python -m demo.online --seeds 3       # `make online`: online RPO rounds against offline RPO, DPO and SFT

Rewards take (PIL images, prompts) and return one float per image, the form online_rpo.py's --reward
"module:function" expects: `hidden_reward` is the relative world's (demo/relative.py: prompt faithfulness plus the
shape's area), `content_reward` the content accuracy alone (1 for the right colour and position), a reward the loop
does not train on.
"""

import numpy as np

from demo import world


SCENES = {scene.caption: scene for scene in world.all_scenes()}


def scene_of(prompt):
    if prompt not in SCENES:
        raise ValueError(f"{prompt!r} is not a caption of the toy world (e.g. {next(iter(SCENES))!r}).")
    return SCENES[prompt]


def hidden_reward(images, prompts):
    return [world.hidden_reward(np.asarray(image.convert("RGB")), scene_of(p)) for image, p in zip(images, prompts)]


def content_reward(images, prompts):
    return [float(world.content_correct(np.asarray(i.convert("RGB")), scene_of(p))) for i, p in zip(images, prompts)]
