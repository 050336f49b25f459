"""MLflow "models from code" entry: logged with the model, run when it loads (no pickled Python object).

See `pipelines.preranking.serving.log_preranker`; the class itself lives in `serving.py`.
"""

import sys
from pathlib import Path

# MLflow puts the model's carried code (`code_paths`: code/pipelines) first on sys.path. Moved last: where searchrel
# is installed its full package wins, and a process this one spawns later (which copies sys.path) never imports
# the partial copy; where it is not installed, the carried modules are still found.
_carried = [p for p in sys.path if Path(p).name == "code" and (Path(p) / "pipelines").is_dir()]
sys.path[:] = [p for p in sys.path if p not in _carried] + _carried

from mlflow.models import set_model  # noqa: E402 (after the path fix above)

from pipelines.preranking.serving import PreRankerModel  # noqa: E402

set_model(PreRankerModel())
