"""Add the offset analysis near and away from boundaries (analyze.py's ``by_region``) and the per-position field's
R^2 (``offset_field``) to study JSON whose analysis predates them, from the runs' checkpoints.

    python experiments/pretrained/regions.py RUNS_DIR RESULTS_DIR [RESULTS_DIR ...] --data-root ../shared/data/camvid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "camvid"))
from analyze import analyze  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--data-root", type=Path)
    args = p.parse_args()
    for folder in args.results:
        for path in sorted(folder.glob("*_seed*.json")):
            run = json.loads(path.read_text())
            if "analysis" not in run or {"by_region", "offset_field"} <= run["analysis"].keys():
                continue
            ckpt = args.runs / path.stem / "last.pth"
            if not ckpt.is_file():
                print(f"{path.name}: no checkpoint {ckpt}, left as it is")
                continue
            run["analysis"] = analyze(ckpt, args.data_root)
            path.write_text(json.dumps(run, indent=1) + "\n")
            print(f"{path.name}: {run['analysis']['by_region']}, R^2 of a fixed field "
                  f"{run['analysis']['offset_field']['r2']}", flush=True)


if __name__ == "__main__":
    main()
