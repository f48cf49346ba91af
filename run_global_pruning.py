#!/usr/bin/env python
"""H-GSP pruning, as in the usage document:

    python run_global_pruning.py --base_model PATH --output_name NAME --pruning_ratio 0.5

Same flags and behaviour as ``hgsp prune`` (``--help`` lists them all).
"""

import os
import sys

# Run from a source checkout without installing: put src/ on the path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from hgsp.cli import prune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(prune_main())
