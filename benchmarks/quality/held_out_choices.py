"""The held-out split of the instruction-tuning measurements (README, Instruction tuning):
`train90.txt`, the first 90% of a tinyshakespeare-layout file cut at a block boundary, and
`mc.jsonl`, "which speaker said this?" questions (4 choices) from the last 10%'s speeches by
speakers who reply at least 10 times in the training part.

    python -m benchmarks.quality.held_out_choices ../shared/data/tinyshakespeare.txt OUT_DIR
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from fedrun.data.shakespeare import read_speeches
from fedrun.data.shakespeare_dialogue import dialogue


def main(source: str, out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    raw = Path(source).read_bytes()
    cut = raw.index(b"\n\n", int(len(raw) * 0.9)) + 2
    (folder / "train90.txt").write_bytes(raw[:cut])
    (folder / "heldout10.txt").write_bytes(raw[cut:])
    speakers = sorted(name for name, replies in dialogue(read_speeches(str(folder / "train90.txt"))[0])
                      if len(replies) >= 10)
    rng = random.Random(0)
    rows = []
    for speaker, said in read_speeches(str(folder / "heldout10.txt"))[0]:
        line = said.decode().splitlines()[0].strip()
        if speaker not in speakers or len(line) < 30:
            continue
        choices = [*rng.sample([s for s in speakers if s != speaker], 3), speaker]
        rng.shuffle(choices)
        rows.append({"question": f'Which speaker said this? "{line}"', "choices": choices,
                     "answer": choices.index(speaker)})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(speakers)} speakers; {len(rows)} questions in {folder / 'mc.jsonl'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
