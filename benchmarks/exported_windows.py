"""What the scripts that read the exported calibration windows share.

``llm_pruner_grouping.py``, ``reference_shortgpt.py``, ``reference_flap.py`` and
``reference_llm_pruner.py`` take the model and the windows ``export_calibration.py`` wrote, and
start their result files with the same header. Not a script: they import it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WINDOWS = ROOT / "benchmarks" / "results" / "calibration" / "calibration.pt"


def add_arguments(parser) -> None:
    """``--model`` and ``--calibration``."""
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--calibration", default=str(WINDOWS),
                        help="token windows written by export_calibration.py")


def model_dir(args) -> str:
    from hgsp.assets import asset_paths

    return args.model or str(asset_paths()["model"])


def load_windows(args, model: str):
    """The calibration windows, and the header of a result file: the model, the windows file
    (relative to the repository when it is the committed one, so the path holds anywhere) and
    their shape."""
    import torch

    ids = torch.load(args.calibration, weights_only=True)["calibration"]
    calibration = Path(args.calibration).resolve()
    if calibration.is_relative_to(ROOT):
        calibration = calibration.relative_to(ROOT)
    return ids, {"model": model, "calibration": str(calibration), "windows": list(ids.shape)}
