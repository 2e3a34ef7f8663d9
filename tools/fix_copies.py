"""Copies the shared block of train_diffusion_rpo.py (everything after `# END SCRIPT-SPECIFIC`) into the other training
scripts, as diffusers' `make fix-copies` does for its "Copied from" blocks. Edit the shared code in
train_diffusion_rpo.py, then run `make fix-copies`; tests/test_script_parity.py fails while a copy differs."""

import glob
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "train_diffusion_rpo.py")
END_MARKER = "# END SCRIPT-SPECIFIC\n"


def shared_block(text):
    return text[text.index(END_MARKER) :]


def main(check=False):
    shared = shared_block(open(SOURCE).read())
    stale = []
    for path in sorted(glob.glob(os.path.join(ROOT, "train_diffusion_rpo_*.py"))):
        text = open(path).read()
        updated = text[: text.index(END_MARKER)] + shared
        if updated != text:
            stale.append(os.path.basename(path))
            if not check:
                with open(path, "w") as f:
                    f.write(updated)
    verb = "differ from" if check else "updated from"
    print(f"{', '.join(stale) or 'no script'} {verb} train_diffusion_rpo.py's shared block.")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
